"""Training-mode BatchNorm (BatchNormInternal) and its gradient (BatchNormalizationGrad), as ORT's CPU kernels compute them.

Statistics are over all axes but the channel axis; the variance is biased (divided by N*spatial) both for
normalizing and for the running_var update; running = running * momentum + batch * (1 - momentum);
saved_inv_std = sqrt(1 / (var + epsilon)).
"""

from __future__ import annotations

from .builder import Builder


def _axes(b: Builder, x: str) -> list[int]:
    return [0] + list(range(2, len(b.shape(x))))


def _per_channel(b: Builder, v: str, rank: int) -> str:
    """[C] -> [1, C, 1, ...] for broadcasting against an NC... tensor."""
    return b.op("Unsqueeze", [v, b.const([0] + list(range(2, rank)))])


def lower_batch_norm_internal(b: Builder) -> None:
    """BatchNormInternal(X, scale, B, mean, var) -> ReduceMean stats, (X - m) * rsqrt(v + eps) * scale + B, momentum updates."""
    x, scale, bias, run_mean, run_var = (b.input(i) for i in range(5))
    rank = len(b.shape(x))
    axes = b.const(_axes(b, x))
    eps, momentum = b.attr("epsilon", 1e-5), b.attr("momentum", 0.9)
    mean = b.op("ReduceMean", [x], axes=_axes(b, x), keepdims=1)
    diff = b.op("Sub", [x, mean])
    var = b.op("ReduceMean", [b.op("Mul", [diff, diff])], axes=_axes(b, x), keepdims=1)
    inv_std = b.op("Sqrt", [b.op("Reciprocal", [b.op("Add", [var, b.scalar(eps, x)])])])
    k = b.op("Mul", [inv_std, _per_channel(b, scale, rank)])
    b.op("Add", [b.op("Mul", [diff, k]), _per_channel(b, bias, rank)], [b.output(0)])
    saved_mean = b.op("Squeeze", [mean, axes], [b.output(3)] if b.output(3) else 1)
    if b.output(4):
        b.op("Squeeze", [inv_std, axes], [b.output(4)])
    for i, running, batch in ((1, run_mean, saved_mean), (2, run_var, None)):
        if not b.output(i):
            continue
        batch = batch or b.op("Squeeze", [var, axes])
        kept = b.op("Mul", [running, b.scalar(momentum, x)])
        b.op("Add", [kept, b.op("Mul", [batch, b.scalar(1.0 - momentum, x)])], [b.output(i)])


def lower_batch_norm_grad(b: Builder) -> None:
    """BatchNormalizationGrad(dY, X, scale, mean, inv_std) -> ReduceSum(dY), ReduceSum(dY * xhat),
    scale * inv_std * (dY - (dBias + xhat * dScale) / M)."""
    dy, x, scale, mean, inv_std = (b.input(i) for i in range(5))
    rank = len(b.shape(x))
    axes = b.const(_axes(b, x))
    inv4 = _per_channel(b, inv_std, rank)
    xhat = b.op("Mul", [b.op("Sub", [x, _per_channel(b, mean, rank)]), inv4])
    dbias4 = b.op("ReduceSum", [dy, axes], keepdims=1)
    dscale4 = b.op("ReduceSum", [b.op("Mul", [xhat, dy]), axes], keepdims=1)
    if b.output(2):
        b.op("Squeeze", [dbias4, axes], [b.output(2)])
    if b.output(1):
        b.op("Squeeze", [dscale4, axes], [b.output(1)])
    if b.output(0):
        # M = elements per channel = Size(X) / C, batch-size generic
        channels = b.op("Cast", [b.op("Size", [scale])], to=b.elem_type(x))
        m = b.op("Div", [b.op("Cast", [b.op("Size", [x])], to=b.elem_type(x)), channels])
        correction = b.op("Div", [b.op("Add", [dbias4, b.op("Mul", [xhat, dscale4])]), m])
        k = b.op("Mul", [_per_channel(b, scale, rank), inv4])
        b.op("Mul", [k, b.op("Sub", [dy, correction])], [b.output(0)])
