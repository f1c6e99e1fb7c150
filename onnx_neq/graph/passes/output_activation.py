"""OutputActivationPass: the loss takes logits, so a Softmax / LogSoftmax at the output goes.

Before:  out = T(Softmax <axis = a> (logits))    out is the graph output; T is zero or more nodes that
         keep the values (Identity, Cast to the same type, Reshape, Flatten, Squeeze: Paddle ends in
         Softmax -> Identity; onnx's opset converter writes Reshape(Softmax(Flatten(x)), Shape(x)))
After:   logits is the graph output, the activation and T are gone (with what only fed them, such as
         a Reshape's Shape); the removed op, its axis and the output's name are reported (the manifest
         keeps them and every inference model gets the op back: `append_output_activation`)
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnx_neq.graph.conv_layers import keeps_values
from onnx_neq.graph.passes._result import ReportedResult

ACTIVATIONS = ("Softmax", "LogSoftmax")
_SAME_SHAPE = ("Identity", "Cast")


@dataclass(frozen=True)
class OutputActivationReport:
    removed: dict | None  # {"op", "axis", "output"} of the removed activation; None when there was none to remove


class OutputActivationPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedResult[OutputActivationReport]:
        graph = model.graph
        out = graph.outputs[0]
        nodes = _activation_nodes(out)
        logits = nodes[0].inputs[0] if nodes else None
        if logits is None or len(out.uses()) > 0 or logits.is_graph_input() or logits.is_initializer():
            return ReportedResult(model, False, OutputActivationReport(None))
        activation = nodes[0]
        removed = {"op": activation.op_type, "axis": activation.attributes.get_int("axis", -1), "output": out.name}
        logits.type = logits.type or out.type
        if logits.shape is None and all(node.op_type in _SAME_SHAPE for node in nodes[1:]):
            logits.shape = out.shape
        graph.outputs[0] = logits
        for node in reversed(nodes):
            graph.remove(node, safe=True)
        RemoveUnusedNodesPass()(model)  # what only fed the removed nodes (a Reshape's Shape or shape constant)
        return ReportedResult(model, True, OutputActivationReport(removed))


def _activation_nodes(out: ir.Value) -> list[ir.Node]:
    """[activation, *T] in graph order, each value between them used once; [] where there is none."""
    tail = []
    node = out.producer()
    while node is not None and keeps_values(node):
        tail.append(node)
        value = node.inputs[0]
        if len(value.uses()) != 1 or value.is_graph_output():
            return []
        node = value.producer()
    if node is None or node.op_type not in ACTIVATIONS or node.domain not in ("", "ai.onnx"):
        return []
    return [node, *reversed(tail)]


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
