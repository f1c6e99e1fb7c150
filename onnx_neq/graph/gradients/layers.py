"""Gradients of convolution, training-mode BatchNorm, pooling, reductions, Gemm and MatMul.

Conv, BatchNormalization, MaxPool and AveragePool go through the lowering rules of ORT's ConvGrad,
BatchNormalizationGrad, MaxPoolGrad and AveragePoolGrad: the dW forms, the BatchNorm summation order
(bit-identical to ORT's CPU kernel) and the pooling scatter are the lowering's. ConvGrad is named
`<conv>_Grad/ConvGrad_0`, so its lowered nodes carry that prefix (graph/specialize.py raises a conv's
gradient nodes back into one ConvGrad by it). AveragePool follows PyTorch's gradient where ORT's
kernel does not (3-D windows, a dynamic batch): see lowering/pool_grads.py.
"""

from __future__ import annotations

import math

from onnx_neq.graph.gradients.broadcast import reshape_to, unbroadcast
from onnx_neq.graph.gradients.context import GradContext


def conv(g: GradContext) -> None:
    """ConvGrad(dY, X, W) -> dX, dW, dB: only the outputs whose inputs need a gradient are computed."""
    outs = [g.fresh_like(hint, g.x(i)) if g.needs(i) else "" for i, hint in enumerate(("dX", "dW", "dB"))]
    g.lowered("ConvGrad", [g.dy(), g.x(0), g.x(1)], outs, name=f"{g.forward.name}_Grad/ConvGrad_0")
    for i, out in enumerate(outs):
        if out:
            g.set_grad(i, out)


def batch_norm(g: GradContext) -> None:
    """Training-mode BatchNorm (the builder computed its forward pass with BatchNormInternal's lowering and
    kept the batch mean and inverse std): BatchNormalizationGrad(dY, X, scale, mean, inv_std)."""
    mean, inv_std = g.saved[g.forward.name]
    outs = [g.fresh_like(hint, g.x(i)) if g.needs(i) else "" for i, hint in enumerate(("dX", "dScale", "dB"))]
    g.lowered("BatchNormalizationGrad", [g.dy(), g.x(0), g.x(1), mean, inv_std], outs)
    for i, out in enumerate(outs):
        if out:
            g.set_grad(i, out)


def max_pool(g: GradContext) -> None:
    """MaxPoolGrad(dY, Indices): the builder gave the forward MaxPool its Indices output."""
    dx = g.fresh_like("dX", g.x(0))
    g.lowered("MaxPoolGrad", [g.dy(), g.y(1)], [dx], domain="")
    g.set_grad(0, dx)


def average_pool(g: GradContext) -> None:
    if g.attr("ceil_mode", 0):
        raise g.fail("AveragePool with ceil_mode=1 has no gradient rule; export it with ceil_mode=0")
    dx = g.fresh_like("dX", g.x(0))
    g.lowered("AveragePoolGrad", [g.dy()], [dx], domain="")
    g.set_grad(0, dx)


def global_average_pool(g: GradContext) -> None:
    """dY / (H * W), expanded to X's shape."""
    x = g.x(0)
    positions = math.prod(g.static_dims(x, 2))
    scaled = g.op("Div", [g.dy(), g.scalar(float(positions), x)])
    g.set_grad(0, g.op("Expand", [scaled, g.op("Shape", [x])]))


def _reduced_axes(g: GradContext) -> list[int]:
    """The axes a Reduce* node reduces (attribute or constant input; none given: all), made non-negative."""
    rank = g.rank(g.x(0))
    axes = g.attr("axes")
    if axes is None and g.x(1):
        axes = g.constant_ints(g.x(1))
        if axes is None:
            raise g.fail("its axes are not a constant, so its gradient cannot be built")
    if not axes:
        if g.attr("noop_with_empty_axes", 0):
            return []
        return list(range(rank))
    return sorted(a % rank for a in axes)


def _kept(g: GradContext, value: str, axes: list[int]) -> str:
    """`value` (a reduction's output or its gradient) with the reduced axes restored as 1s."""
    return value if g.attr("keepdims", 1) or not axes else g.op("Unsqueeze", [value, g.const(axes)])


def reduce_sum(g: GradContext) -> None:
    axes = _reduced_axes(g)
    g.set_grad(0, g.op("Expand", [_kept(g, g.dy(), axes), g.op("Shape", [g.x(0)])]))


def reduce_mean(g: GradContext) -> None:
    """dY / count, expanded to X's shape."""
    x = g.x(0)
    axes = _reduced_axes(g)
    dims = g.shape(x)
    count = [dims[a] for a in axes]
    if all(isinstance(d, int) for d in count):
        divisor = g.scalar(float(math.prod(count)), x)
    else:
        divisor = g.op("Cast", [g.op("Div", [g.op("Size", [x]), g.op("Size", [g.y(0)])])], to=g.elem_type(x))
    scaled = g.op("Div", [_kept(g, g.dy(), axes), divisor])
    g.set_grad(0, g.op("Expand", [scaled, g.op("Shape", [x])]))


def reduce_max(g: GradContext) -> None:
    """dY shared equally among the maxima of each window (as PyTorch's amax)."""
    x = g.x(0)
    axes = _reduced_axes(g)
    hit = g.op("Cast", [g.op("Equal", [x, _kept(g, g.y(0), axes)])], to=g.elem_type(x))
    ties = g.op("ReduceSum", [hit, g.const(axes)], keepdims=1) if axes else hit
    g.set_grad(0, g.op("Mul", [g.op("Div", [_kept(g, g.dy(), axes), ties]), hit]))


def gemm(g: GradContext) -> None:
    """Y = alpha * op(A) op(B) + beta * C: two Gemms for dA and dB, C's gradient summed to its shape."""
    dy, a, b = g.dy(), g.x(0), g.x(1)
    alpha, beta = g.attr("alpha", 1.0), g.attr("beta", 1.0)
    trans_a, trans_b = g.attr("transA", 0), g.attr("transB", 0)
    scale = {"alpha": alpha} if alpha != 1.0 else {}
    if g.needs(0):
        if trans_a:
            g.set_grad(0, g.op("Gemm", [b, dy], transA=trans_b, transB=1, **scale))
        else:
            g.set_grad(0, g.op("Gemm", [dy, b], transA=0, transB=1 - trans_b, **scale))
    if g.needs(1):
        if trans_b:
            g.set_grad(1, g.op("Gemm", [dy, a], transA=1, transB=trans_a, **scale))
        else:
            g.set_grad(1, g.op("Gemm", [a, dy], transA=1 - trans_a, transB=0, **scale))
    if g.needs(2):
        dc = dy if beta == 1.0 else g.op("Mul", [dy, g.scalar(beta, dy)])
        g.set_grad(2, unbroadcast(g, dc, g.y(0), g.x(2)))


def matmul(g: GradContext) -> None:
    """dA = dY @ B^T and dB = A^T @ dY (transposing the last two axes), summed over broadcast batch axes."""
    dy, a, b = g.dy(), g.x(0), g.x(1)
    ra, rb = g.rank(a), g.rank(b)
    if ra < 2 or rb < 2:
        raise g.fail("MatMul with a 1-D operand has no gradient rule; reshape the operand to 2-D in the source model")
    if ra == rb == 2:
        if g.needs(0):
            g.set_grad(0, g.op("Gemm", [dy, b], transB=1))
        if g.needs(1):
            g.set_grad(1, g.op("Gemm", [a, dy], transA=1))
        return
    if g.needs(0):
        full = g.op("MatMul", [dy, _swap_last(g, b, rb)])
        g.set_grad(0, _summed_to(g, full, a, ra, rb))
    if g.needs(1):
        full = g.op("MatMul", [_swap_last(g, a, ra), dy])
        g.set_grad(1, _summed_to(g, full, b, rb, ra))


def _swap_last(g: GradContext, value: str, rank: int) -> str:
    return g.op("Transpose", [value], perm=list(range(rank - 2)) + [rank - 1, rank - 2])


def _summed_to(g: GradContext, full: str, target: str, rank_t: int, rank_other: int) -> str:
    """A MatMul gradient summed over the batch axes that `target` broadcast along."""
    out_rank = max(rank_t, rank_other)
    t_shape = g.shape(target)
    y_batch = g.shape(g.y(0))[: out_rank - 2]
    lead = out_rank - rank_t
    axes = list(range(lead)) + [lead + i for i, d in enumerate(t_shape[:-2]) if d == 1 and y_batch[lead + i] != 1]
    if not axes:
        return full
    summed = g.op("ReduceSum", [full, g.const(axes)], keepdims=1)
    return reshape_to(g, summed, target)


def softmax_cross_entropy(g: GradContext) -> None:
    """The loss the builder appends: SoftmaxCrossEntropyLossGrad(dLoss, log_prob, labels)."""
    dx = g.fresh_like("dX", g.x(0))
    g.lowered("SoftmaxCrossEntropyLossGrad", [g.dy(), g.y(1), g.x(1)], [dx])
    g.set_grad(0, dx)
