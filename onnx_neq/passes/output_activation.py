"""OutputActivationPass: the loss takes logits, so a Softmax / LogSoftmax at the output goes.

Before:  probs = Softmax <axis = a> (logits)      probs is the graph output
After:   logits is the graph output; the removed op and axis are reported (the manifest keeps
         them and the inference model gets the op back: `append_output_activation`)
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

ACTIVATIONS = ("Softmax", "LogSoftmax")


class OutputActivationPass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.removed: dict | None = None  # {"op", "axis", "output"}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        out = graph.outputs[0]
        node = out.producer()
        if node is None or node.op_type not in ACTIVATIONS or len(out.uses()) > 0:
            return ir.passes.PassResult(model, modified=False)
        logits = node.inputs[0]
        self.removed = {"op": node.op_type, "axis": node.attributes.get_int("axis", -1), "output": out.name}
        if logits.is_graph_input() or logits.is_initializer():
            return ir.passes.PassResult(model, modified=False)
        logits.shape = logits.shape or out.shape
        logits.type = logits.type or out.type
        graph.outputs[0] = logits
        graph.remove(node, safe=True)
        return ir.passes.PassResult(model, modified=True)


def append_output_activation(model: onnx.ModelProto, removed: dict) -> onnx.ModelProto:
    """Put the removed Softmax / LogSoftmax back at the output of an inference model."""
    logits = model.graph.output[0]
    node = onnx.helper.make_node(removed["op"], [logits.name], [removed["output"]], axis=removed["axis"], name="neq.output_activation")
    model.graph.node.append(node)
    new_out = onnx.helper.make_tensor_value_info(removed["output"], logits.type.tensor_type.elem_type, None)
    new_out.type.tensor_type.shape.CopyFrom(logits.type.tensor_type.shape)
    del model.graph.output[:]
    model.graph.output.append(new_out)
    return model
