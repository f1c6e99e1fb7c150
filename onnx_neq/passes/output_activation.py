"""OutputActivationPass: the loss takes logits, so a Softmax / LogSoftmax at the output goes.

Before:  probs = Softmax <axis = a> (logits)      probs is the graph output
         (or, after onnx's opset converter: probs = Reshape(Softmax(Flatten(x)), Shape(x)))
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
        nodes = _activation_nodes(out)
        if not nodes or len(out.uses()) > 0:
            return ir.passes.PassResult(model, modified=False)
        activation = nodes[0]
        logits = activation.inputs[0]
        if logits.is_graph_input() or logits.is_initializer():
            return ir.passes.PassResult(model, modified=False)
        self.removed = {"op": activation.op_type, "axis": activation.attributes.get_int("axis", -1), "output": out.name}
        logits.type = logits.type or out.type
        graph.outputs[0] = logits
        for node in reversed(nodes):
            graph.remove(node, safe=True)
        for node in list(graph):  # a Shape feeding only the removed Reshape
            if node.op_type == "Shape" and not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
                graph.remove(node, safe=True)
        return ir.passes.PassResult(model, modified=True)


def _activation_nodes(out: ir.Value) -> list[ir.Node]:
    """[Softmax] or [Softmax, Reshape] (the version converter's Flatten-Softmax-Reshape)."""
    node = out.producer()
    if node is not None and node.op_type in ACTIVATIONS:
        return [node]
    if node is not None and node.op_type == "Reshape":
        inner = node.inputs[0].producer()
        if inner is not None and inner.op_type in ACTIVATIONS and len(node.inputs[0].uses()) == 1:
            flat = inner.inputs[0].producer()
            if flat is not None and flat.op_type == "Flatten":
                return [inner, node]
    return []


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
