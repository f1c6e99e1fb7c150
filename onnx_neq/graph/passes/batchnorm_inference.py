"""BatchNormInferencePass: BatchNormalization in inference mode, with its single output.

Before:  Y, running_mean_out, running_var_out = BatchNormalization[training_mode=1](X, s, b, m, v)
After:   Y = BatchNormalization(X, s, b, m, v)

ORT writes eval models with training_mode=0 but keeps the extra outputs, which the
BatchNormalization schema forbids in inference mode; this pass drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from onnx_neq.graph.passes._result import ReportedResult


@dataclass(frozen=True)
class BatchNormInferenceReport:
    changed: int  # BatchNorms put in inference mode (training_mode dropped, extra outputs too)


class BatchNormInferencePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedResult[BatchNormInferenceReport]:
        graph_outputs = {v.name for v in model.graph.outputs}
        changed = 0
        for node in model.graph:
            if node.op_type != "BatchNormalization":
                continue
            extra = node.outputs[1:]
            if any(v.uses() or v.name in graph_outputs for v in extra):
                continue  # someone reads the running statistics: leave the node alone
            if "training_mode" not in node.attributes and not extra:
                continue  # already in inference mode
            node.attributes.pop("training_mode", None)
            if extra:
                node.resize_outputs(1)
            changed += 1
        return ReportedResult(model, changed > 0, BatchNormInferenceReport(changed))
