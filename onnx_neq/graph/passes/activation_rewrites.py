"""ActivationRewritePass: ops without a gradient in ORT 1.19.2, as exact differentiable ops.

HardSigmoid <alpha, beta> (x)  ->  Clip(alpha * x + beta, 0, 1)
HardSwish (x)                  ->  x * Clip(x / 6 + 1/2, 0, 1)
Softplus (x)                   ->  Relu(x) + Log(1 + Exp(-Abs(x)))              (stable for large |x|)
Elu <alpha> (x)                ->  Relu(x) + alpha * (Exp(-Relu(-x)) - 1)        (no Exp overflow)
GlobalMaxPool (x)              ->  ReduceMax <axes = spatial, keepdims = 1> (x)
PRelu (x, slope)               ->  Relu(x) - slope * Relu(-x)
Sum (a, b, c, ...)             ->  Add(Add(a, b), c) ...
LRN <size, alpha, beta, bias>  ->  x / (bias + Conv1x1(x^2, band))^beta
                                   (the channel-window sum as a constant banded C x C 1x1 conv)
AveragePool (static shapes)     ->  depthwise Conv with a constant 1/k kernel (times 1/count per
                                   output position without count_include_pad)

AveragePool has an ORT gradient, but ORT 1.19.2's AveragePoolGrad sizes dX from the statically
inferred shape (a dynamic batch becomes 0) and its 3-D form overwrites instead of accumulating;
ConvGrad has neither problem. The added convs hold constants: they are not layers and never train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_neq.graph.lowering.pool_grads import inverse_counts
from onnx_neq.graph.passes._result import ReportedResult
from onnx_neq.graph.passes._splice import splice, take_over


@dataclass(frozen=True)
class ActivationRewriteReport:
    rewritten: dict[str, int]  # op type -> how many nodes of it were rewritten


class ActivationRewritePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedResult[ActivationRewriteReport]:
        graph = model.graph
        rewritten: dict[str, int] = {}
        for node in list(graph):
            build = _REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if build is None:
                continue
            builder = _Builder(node)
            out = build(builder, node)
            if out is None:  # this node's form needs no rewrite
                continue
            builder.finish(graph, out)
            rewritten[node.op_type] = rewritten.get(node.op_type, 0) + 1
        return ReportedResult(model, bool(rewritten), ActivationRewriteReport(rewritten))


class _Builder:
    """Records the replacement of `node` on a tape, named after it (<node>.<op><n>, <node>.c<n>), then
    puts it in before the node and hands the node's output over."""

    def __init__(self, node: ir.Node):
        self.tape, self.node, self.n = ir.tape.Tape(), node, 0
        self.prefix = node.name or node.outputs[0].name

    def op(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        self.n += 1
        name = f"{self.prefix}.{op_type.lower()}{self.n}"
        return self.tape.op(op_type, list(inputs), attributes=attributes or None, name=name, output=ir.Value(name=name))

    def const(self, value: float) -> ir.Value:
        return self.array(np.array(value, np.float32))

    def array(self, values: np.ndarray) -> ir.Value:
        self.n += 1
        name = f"{self.prefix}.c{self.n}"
        return self.tape.initializer(ir.tensor(values, name=name))

    def finish(self, graph: ir.Graph, out: ir.Value) -> None:
        splice(graph, self.tape, before=self.node)
        out.type, out.shape = self.node.outputs[0].type, self.node.outputs[0].shape
        take_over(self.node.outputs[0], out)
        graph.remove(self.node, safe=True)


def _hard_sigmoid(b: _Builder, x: ir.Value, alpha: float, beta: float) -> ir.Value:
    return b.op("Clip", b.op("Add", b.op("Mul", x, b.const(alpha)), b.const(beta)), b.const(0.0), b.const(1.0))


def _softplus(b: _Builder, node: ir.Node) -> ir.Value:
    x = node.inputs[0]
    tail = b.op("Log", b.op("Add", b.op("Exp", b.op("Neg", b.op("Abs", x))), b.const(1.0)))
    return b.op("Add", b.op("Relu", x), tail)


def _elu(b: _Builder, node: ir.Node) -> ir.Value:
    x = node.inputs[0]
    alpha = node.attributes.get_float("alpha", 1.0)
    negative = b.op("Sub", b.op("Exp", b.op("Neg", b.op("Relu", b.op("Neg", x)))), b.const(1.0))
    return b.op("Add", b.op("Relu", x), b.op("Mul", negative, b.const(alpha)))


def _global_max_pool(b: _Builder, node: ir.Node) -> ir.Value:
    x = node.inputs[0]
    rank = x.shape.rank() if x.shape is not None else 4
    return b.op("ReduceMax", x, keepdims=1, axes=list(range(2, rank)))


def _prelu(b: _Builder, node: ir.Node) -> ir.Value:
    x, slope = node.inputs[0], node.inputs[1]
    return b.op("Sub", b.op("Relu", x), b.op("Mul", slope, b.op("Relu", b.op("Neg", x))))


def _sum(b: _Builder, node: ir.Node) -> ir.Value:
    total = node.inputs[0]
    for other in node.inputs[1:]:
        total = b.op("Add", total, other)
    return total if len(node.inputs) > 1 else b.op("Identity", total)


def _lrn(b: _Builder, node: ir.Node) -> ir.Value | None:
    x = node.inputs[0]
    channels = x.shape[1] if x.shape is not None and x.shape.rank() >= 3 else None
    if not isinstance(channels, int):
        return None  # left as LRN: the gradient build then names it
    size = node.attributes.get_int("size", 1)
    alpha, beta, bias = (node.attributes.get_float(k, d) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    begin, end = (size - 1) // 2, size // 2
    band = np.zeros((channels, channels) + (1,) * (x.shape.rank() - 2), np.float32)
    for c in range(channels):
        band[c, max(c - begin, 0) : c + end + 1] = alpha / size
    window = b.op("Conv", b.op("Mul", x, x), b.array(band))
    return b.op("Div", x, b.op("Pow", b.op("Add", window, b.const(bias)), b.const(beta)))


def _average_pool(b: _Builder, node: ir.Node) -> ir.Value | None:
    x, y = node.inputs[0], node.outputs[0]
    kernel = list(node.attributes.get_ints("kernel_shape", []))
    r = len(kernel)
    strides = list(node.attributes.get_ints("strides", [1] * r))
    pads = list(node.attributes.get_ints("pads", [0] * 2 * r))
    dims = [*x.shape[1:], *y.shape[2:]] if x.shape is not None and y.shape is not None else [None]
    plain = node.attributes.get_int("ceil_mode", 0) == 0 and node.attributes.get_string("auto_pad", "NOTSET") == "NOTSET"
    if not plain or not all(isinstance(d, int) for d in dims):
        return None  # left as it is: ORT's gradient is right only with a static batch (the light zoo's)
    channels = x.shape[1]
    include = node.attributes.get_int("count_include_pad", 0) or not any(pads)
    weight = np.full((channels, 1, *kernel), 1.0 / math.prod(kernel) if include else 1.0, np.float32)
    summed = b.op("Conv", x, b.array(weight), group=channels, strides=strides, pads=pads, kernel_shape=kernel)
    if include:
        return summed
    scale = inverse_counts(0, kernel, strides, pads[:r], list(x.shape[2:]), list(y.shape[2:]))
    return b.op("Mul", summed, b.array(scale.astype(np.float32)))


_REWRITES = {
    "HardSigmoid": lambda b, n: _hard_sigmoid(b, n.inputs[0], n.attributes.get_float("alpha", 0.2), n.attributes.get_float("beta", 0.5)),
    "HardSwish": lambda b, n: b.op("Mul", n.inputs[0], _hard_sigmoid(b, n.inputs[0], 1 / 6, 0.5)),
    "Softplus": _softplus,
    "Elu": _elu,
    "GlobalMaxPool": _global_max_pool,
    "PRelu": _prelu,
    "Sum": _sum,
    "LRN": _lrn,
    "AveragePool": _average_pool,
}

REWRITTEN_OPS = tuple(op for op in _REWRITES if op != "AveragePool")  # ops with no ORT gradient at all
