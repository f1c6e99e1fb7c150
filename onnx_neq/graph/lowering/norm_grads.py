"""Training-mode BatchNorm (BatchNormInternal) and its gradient (BatchNormalizationGrad), as ORT's CPU kernels compute them.

Statistics are over all axes but the channel axis; the variance is biased (divided by N*spatial) both for
normalizing and for the running_var update; running = running * momentum + batch * (1 - momentum);
saved_inv_std = sqrt(1 / (var + epsilon)).
"""

from __future__ import annotations

import numpy as np

from onnx_neq.graph.lowering.builder import Builder


def _axes(b: Builder, x: str) -> list[int]:
    return [0] + list(range(2, len(b.shape(x))))


def _per_channel(b: Builder, v: str, rank: int) -> str:
    """[C] -> [1, C, 1, ...] for broadcasting against an NC... tensor."""
    return b.op("Unsqueeze", [v, b.const([0] + list(range(2, rank)))])


def lower_batch_norm_internal(b: Builder) -> None:
    """BatchNormInternal(X, scale, B, mean, var), in the CPU kernel's order of float32 operations, so that the
    lowered forward pass is bit-identical to ORT's and no ReLU input lands on the other side of 0: sums per
    (n, c) plane, then over n, divided by N*spatial; k = inv_std * scale; Y = X * k + (B - mean * k)."""
    x, scale, bias, run_mean, run_var = (b.input(i) for i in range(5))
    rank = len(b.shape(x))
    axes = b.const(_axes(b, x))
    eps, momentum = b.attr("epsilon", 1e-5), b.attr("momentum", 0.9)
    count = _elements_per_channel(b, x, scale)
    mean = b.op("Div", [_channel_sum(b, x, b.shape(x)), count])
    diff = b.op("Sub", [x, mean])
    var = b.op("Div", [_channel_sum(b, b.op("Mul", [diff, diff]), b.shape(x), from_start=True), count])
    inv_std = b.op("Sqrt", [b.op("Reciprocal", [b.op("Add", [var, b.scalar(eps, x)])])])
    k = b.op("Mul", [inv_std, _per_channel(b, scale, rank)])
    shift = b.op("Sub", [_per_channel(b, bias, rank), b.op("Mul", [mean, k])])
    b.op("Add", [b.op("Mul", [x, k]), shift], [b.output(0)])
    saved_mean = b.op("Squeeze", [mean, axes], [b.output(3)] if b.output(3) else 1)
    if b.output(4):
        b.op("Squeeze", [inv_std, axes], [b.output(4)])
    for i, running, batch in ((1, run_mean, saved_mean), (2, run_var, None)):
        if not b.output(i):
            continue
        batch = batch or b.op("Squeeze", [var, axes])
        kept = b.op("Mul", [running, b.scalar(momentum, x)])
        b.op("Add", [kept, b.op("Mul", [batch, b.scalar(1.0 - momentum, x)])], [b.output(i)])


def _elements_per_channel(b: Builder, x: str, scale: str) -> str:
    """N * spatial = Size(X) / C as a float scalar, batch-size generic."""
    return b.op("Cast", [b.op("Div", [b.op("Size", [x]), b.op("Size", [scale])])], to=b.elem_type(x))


def _channel_sum(b: Builder, v: str, shape: list, from_start: bool = False) -> str:
    """[N, C, ...] -> [1, C, 1, ...]: each (n, c) plane summed, then the N plane sums added in order of n.

    A plane sum is Eigen's: packets of 4 floats from the plane's first 16-byte-aligned element, then the
    elements before and after one by one. The kernel's mean sums X's planes so, as ReduceSum does; its
    variance sums an expression, whose packets start at element 0 of every plane. ReduceSum does that only
    where planes are multiples of 4 floats long; otherwise (from_start) the 4-aligned head of each plane is
    summed as a row of its own and the rest added after it, one element at a time."""
    axes = list(range(2, len(shape)))
    size = int(np.prod(shape[2:])) if all(isinstance(d, int) for d in shape[2:]) else 0
    if not from_start or size % 4 == 0 or size < 4:
        planes = b.op("ReduceSum", [v, b.const(axes)], keepdims=1) if axes else v
    else:
        flat = b.op("Reshape", [v, b.const([0, 0, size])])
        head = size - size % 4
        planes = b.op("ReduceSum", [_plane_slice(b, flat, 0, head), b.const([2])], keepdims=1)
        for i in range(head, size):
            planes = b.op("Add", [planes, _plane_slice(b, flat, i, i + 1)])
        planes = b.op("Reshape", [planes, b.const([0, 0] + [1] * len(axes))])
    return b.op("ReduceSum", [planes, b.const([0])], keepdims=1)


def _plane_slice(b: Builder, flat: str, start: int, end: int) -> str:
    return b.op("Slice", [flat, b.const([start]), b.const([end]), b.const([2])])


def lower_batch_norm_grad(b: Builder) -> None:
    """BatchNormalizationGrad(dY, X, scale, mean, inv_std): dBias = sum dY and dScale = sum (X - mean) *
    inv_std * dY in the CPU kernel's order (bit-identical); dX = scale * inv_std * (dY - (dBias + xhat * dScale) / M),
    M = N * spatial, within rounding of the kernel's dX. (The kernel's own order of dX's operations raised the peak
    memory of a MobileNetV2 step at batch 32, 128 px, from 1040 to 1501 MiB on stock onnxruntime 1.31.1.)"""
    dy, x, scale, mean, inv_std = (b.input(i) for i in range(5))
    shape = b.shape(x)
    axes = b.const(_axes(b, x))
    inv4 = _per_channel(b, inv_std, len(shape))
    xhat = b.op("Mul", [b.op("Sub", [x, _per_channel(b, mean, len(shape))]), inv4])
    dbias4 = _channel_sum(b, dy, shape)
    dscale4 = _channel_sum(b, b.op("Mul", [xhat, dy]), shape, from_start=True)
    if b.output(2):
        b.op("Squeeze", [dbias4, axes], [b.output(2)])
    if b.output(1):
        b.op("Squeeze", [dscale4, axes], [b.output(1)])
    if b.output(0):
        m = _elements_per_channel(b, x, scale)
        correction = b.op("Div", [b.op("Add", [dbias4, b.op("Mul", [xhat, dscale4])]), m])
        k = b.op("Mul", [_per_channel(b, scale, len(shape)), inv4])
        b.op("Mul", [k, b.op("Sub", [dy, correction])], [b.output(0)])
