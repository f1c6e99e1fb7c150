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
from onnx_neq.graph.passes._result import ReportedResult
from onnx_neq.graph.passes._splice import splice


@dataclass(frozen=True)
class GradientMaskReport:
    mask_inputs: tuple[str, ...]  # the mask inputs added, in layer order
    masked_gradients: int


class GradientMaskPass(ir.passes.InPlacePass):
    def __init__(self, layers: list[ConvLayer], user_inputs: list[str]):
        super().__init__()
        self.layers = layers
        self.user_inputs = user_inputs

    def call(self, model: ir.Model) -> ReportedResult[GradientMaskReport]:
        graph = model.graph
        values = _values_by_name(graph)
        position = _after_user_inputs(graph, self.user_inputs)
        masks, masked = [], 0
        for layer in self.layers:
            mask = ir.Value(name=layer.mask_input, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([layer.out_channels]))
            graph.inputs.insert(position, mask)
            position += 1
            params = [(layer.weight, len(layer.kernel) + 2)] + ([(layer.bias, 1)] if layer.bias else [])
            for param, rank in params:
                _mask(graph, values, param, mask, rank)
                masked += 1
            masks.append(mask.name)
        return ReportedResult(model, bool(masks), GradientMaskReport(tuple(masks), masked))


def _mask(graph: ir.Graph, values: dict[str, ir.Value], param: str, mask: ir.Value, rank: int) -> None:
    """`param`'s gradient times the mask (reshaped to [C, 1, ...] for a weight), for every reader of the gradient."""
    grad = values.get(param + "_grad")
    if grad is None or grad.producer() is None:
        raise NeqError(f"the training graph has no gradient for '{param}'; is it listed as trainable?")
    uses = list(grad.uses())
    tape = ir.tape.Tape()
    scale = mask
    if rank > 1:
        shape = tape.initializer(ir.tensor(np.array([-1] + [1] * (rank - 1), np.int64), name=f"{mask.name}.shape{rank}"))
        reshaped = ir.Value(name=f"{mask.name}.{rank}d", type=mask.type)
        scale = tape.op("Reshape", [mask, shape], name=f"{mask.name}.reshape{rank}", output=reshaped)
    product = ir.Value(name=f"{param}_grad.masked", type=grad.type, shape=grad.shape)
    tape.op("Mul", [grad, scale], name=f"{param}_grad.masked", output=product)
    splice(graph, tape, after=grad.producer())
    for consumer, index in uses:
        consumer.replace_input_with(index, product)


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    return {out.name: out for node in graph for out in node.outputs if out.name}


def _after_user_inputs(graph: ir.Graph, user_inputs: list[str]) -> int:
    """Masks go right after the data and label inputs, before parameters and buffers."""
    names = [v.name for v in graph.inputs]
    missing = [n for n in user_inputs if n not in names]
    if missing:
        raise NeqError(f"the training graph lacks the inputs {missing}")
    return max(names.index(n) for n in user_inputs) + 1
