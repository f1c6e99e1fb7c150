"""GradientMaskPass: per-output-channel masks on the parameter gradients of the training graph.

Before:  Conv(X, W, B) ... grad(W) -> InPlaceAccumulatorV2(buf, grad(W))
After:   grad(W) * Reshape(mask, [C, 1, 1, 1]) -> InPlaceAccumulatorV2(buf, ...)
         grad(B) * mask                         -> InPlaceAccumulatorV2(buf, ...)

`mask` is a new float graph input of shape [C_out] (one per Conv; weight and bias share it).
A 0 zeroes the channel's gradient, so plain SGD leaves the channel bit-identical.
Runs on the training model written by onnxruntime.training.artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_neq.errors import NeqError
from onnx_neq.graph.conv_layers import ConvLayer
from onnx_neq.graph.passes._values import add_initializer


@dataclass
class GradientMaskReport:
    mask_inputs: list[str]
    masked_gradients: int


class GradientMaskPass(ir.passes.InPlacePass):
    def __init__(self, layers: list[ConvLayer], user_inputs: list[str]):
        super().__init__()
        self.layers = layers
        self.user_inputs = user_inputs
        self.report = GradientMaskReport([], 0)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = _values_by_name(graph)
        position = _after_user_inputs(graph, self.user_inputs)
        for layer in self.layers:
            mask = ir.Value(name=layer.mask_input, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([layer.out_channels]))
            graph.inputs.insert(position, mask)
            position += 1
            self._mask(graph, values, layer.weight, mask, rank=len(layer.kernel) + 2)
            if layer.bias:
                self._mask(graph, values, layer.bias, mask, rank=1)
            self.report.mask_inputs.append(mask.name)
        return ir.passes.PassResult(model, modified=bool(self.layers))

    def _mask(self, graph: ir.Graph, values: dict[str, ir.Value], param: str, mask: ir.Value, rank: int) -> None:
        grad = values.get(param + "_grad")
        if grad is None or grad.producer() is None:
            raise NeqError(f"the training graph has no gradient for '{param}'; is it listed as trainable?")
        scale = mask
        nodes = []
        if rank > 1:
            shape = add_initializer(graph, f"{mask.name}.shape{rank}", np.array([-1] + [1] * (rank - 1), np.int64))
            reshape = ir.node("Reshape", [mask, shape], name=f"{mask.name}.reshape{rank}")
            scale = reshape.outputs[0]
            scale.name = f"{mask.name}.{rank}d"
            scale.type = mask.type
            nodes.append(reshape)
        uses = list(grad.uses())
        mul = ir.node("Mul", [grad, scale], name=f"{param}_grad.masked")
        mul.outputs[0].name = f"{param}_grad.masked"
        mul.outputs[0].type, mul.outputs[0].shape = grad.type, grad.shape
        nodes.append(mul)
        graph.insert_after(grad.producer(), nodes)
        for consumer, index in uses:
            consumer.replace_input_with(index, mul.outputs[0])
        self.report.masked_gradients += 1


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    return {out.name: out for node in graph for out in node.outputs if out.name}


def _after_user_inputs(graph: ir.Graph, user_inputs: list[str]) -> int:
    """Masks go right after the data and label inputs, before parameters and buffers."""
    names = [v.name for v in graph.inputs]
    missing = [n for n in user_inputs if n not in names]
    if missing:
        raise NeqError(f"the training graph lacks the inputs {missing}")
    return max(names.index(n) for n in user_inputs) + 1
