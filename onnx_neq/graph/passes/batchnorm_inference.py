"""BatchNormInferencePass: BatchNormalization in inference mode, with its single output.

Before:  Y, running_mean_out, running_var_out = BatchNormalization[training_mode=1](X, s, b, m, v)
After:   Y = BatchNormalization(X, s, b, m, v)

ORT writes eval models with training_mode=0 but keeps the extra outputs, which the
BatchNormalization schema forbids in inference mode; this pass drops them.
"""

from __future__ import annotations

import onnx_ir as ir


class BatchNormInferencePass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.changed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph_outputs = {v.name for v in model.graph.outputs}
        for node in model.graph:
            if node.op_type != "BatchNormalization":
                continue
            extra = node.outputs[1:]
            if any(v.uses() or v.name in graph_outputs for v in extra):
                continue  # someone reads the running statistics: leave the node alone
            if "training_mode" in node.attributes:
                node.attributes.pop("training_mode")
            if extra:
                node.resize_outputs(1)
            self.changed += 1
        return ir.passes.PassResult(model, modified=self.changed > 0)
