"""DropoutRemovalPass: inference graphs keep no Dropout.

Before:  Y, mask = Dropout(X, ratio, training_mode)
After:   Y = X   (consumers of Y read X)
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from onnx_neq.graph.passes._result import ReportedResult
from onnx_neq.graph.passes._splice import splice, take_over


@dataclass(frozen=True)
class DropoutRemovalReport:
    removed: int  # Dropout nodes removed


class DropoutRemovalPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedResult[DropoutRemovalReport]:
        graph = model.graph
        removed = 0
        for node in list(graph):
            if node.op_type != "Dropout" or any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
                continue  # not a Dropout, or one whose mask is read
            out, src = node.outputs[0], node.inputs[0]
            if out.is_graph_output():
                tape = ir.tape.Tape()
                identity = tape.op("Identity", [src], name=node.name)
                splice(graph, tape, after=node)
                take_over(out, identity)
            else:
                out.replace_all_uses_with(src)
            graph.remove(node, safe=True)
            removed += 1
        return ReportedResult(model, removed > 0, DropoutRemovalReport(removed))
