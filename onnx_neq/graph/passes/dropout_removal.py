"""DropoutRemovalPass: inference graphs keep no Dropout.

Before:  Y, mask = Dropout(X, ratio, training_mode)
After:   Y = X   (consumers of Y read X)
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_neq.graph.passes._values import take_over


class DropoutRemovalPass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.removed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for node in list(graph):
            if node.op_type != "Dropout" or any(v.uses() for v in node.outputs[1:]):
                continue
            out, src = node.outputs[0], node.inputs[0]
            if out.is_graph_output():
                identity = ir.node("Identity", [src], name=node.name)
                graph.insert_after(node, identity)
                take_over(out, identity.outputs[0])
            else:
                out.replace_all_uses_with(src)
            graph.remove(node, safe=True)
            self.removed += 1
        return ir.passes.PassResult(model, modified=self.removed > 0)
