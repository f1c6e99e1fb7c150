"""Gradients of ops that move values without changing them: reshapes, Transpose, Concat, Split, Slice,
Pad and Expand. Shape-like inputs (a Reshape's shape, Slice's starts, Pad's pads, ...) get no gradient.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from onnx_neq.graph.gradients.broadcast import reshape_to, unbroadcast
from onnx_neq.graph.gradients.context import GradContext


def reshape(g: GradContext) -> None:
    """Reshape, Flatten, Squeeze, Unsqueeze: dY reshaped to X's shape."""
    g.set_grad(0, reshape_to(g, g.dy(), g.x(0)))


def transpose(g: GradContext) -> None:
    rank = g.rank(g.x(0))
    perm = list(g.attr("perm") or range(rank - 1, -1, -1))
    g.set_grad(0, g.op("Transpose", [g.dy()], perm=[perm.index(i) for i in range(rank)]))


def expand(g: GradContext) -> None:
    g.set_grad(0, unbroadcast(g, g.dy(), g.y(0), g.x(0)))


def concat(g: GradContext) -> None:
    """Split(dY) into the inputs' lengths along the axis (constant where static)."""
    inputs = list(g.forward.input)
    rank = g.rank(inputs[0])
    axis = g.attr("axis") % rank
    lengths = [g.shape(x)[axis] for x in inputs]
    if all(isinstance(n, int) for n in lengths):
        sizes = g.const(lengths)
    else:
        sizes = g.op("Concat", [g.op("Shape", [x], start=axis, end=axis + 1) for x in inputs], axis=0)
    outs = [g.fresh_like("dX", x) for x in inputs]
    g.op("Split", [g.dy(), sizes], outs, axis=axis)
    for i, out in enumerate(outs):
        if g.needs(i):
            g.set_grad(i, out)


def split(g: GradContext) -> None:
    """Concat of the outputs' gradients; an output nothing downstream needs contributes zeros."""
    parts = []
    for i, y in enumerate(g.forward.output):
        dy = g.dy(i)
        if dy is None:
            zero = helper.make_tensor("zero", g.elem_type(g.x(0)), [1], [0])
            dy = g.op("ConstantOfShape", [g.op("Shape", [y])], value=zero)
        parts.append(dy)
    g.set_grad(0, g.op("Concat", parts, axis=g.attr("axis", 0)))


def pad(g: GradContext) -> None:
    """Constant padding: dY cropped by the pads (Pad with the pads negated)."""
    mode = g.attr("mode", "constant")
    if mode != "constant":
        raise g.fail(f"Pad in mode {mode!r} has no gradient rule; only constant padding has one")
    if g.x(3):
        raise g.fail("Pad with an axes input has no gradient rule; give pads for every axis")
    pads = g.constant_ints(g.x(1))
    negated = g.const([-p for p in pads]) if pads is not None else g.op("Neg", [g.x(1)])
    g.set_grad(0, g.op("Pad", [g.dy(), negated], mode="constant"))


def slice_(g: GradContext) -> None:
    """dY put back where the slice took it from: Pad for steps of 1, ScatterElements for other steps.
    Starts, ends, axes and steps must be constants and the sliced dims of X static."""
    x = g.x(0)
    dims = g.shape(x)
    rank = len(dims)
    starts, ends = g.constant_ints(g.x(1)), g.constant_ints(g.x(2))
    axes = g.constant_ints(g.x(3)) if g.x(3) else list(range(len(starts or [])))
    steps = g.constant_ints(g.x(4)) if g.x(4) else [1] * len(axes or [])
    if starts is None or ends is None or axes is None or steps is None:
        raise g.fail("its starts, ends, axes and steps must be constants for its gradient")
    grad = g.dy()
    pads = [0] * (2 * rank)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= rank
        size = dims[axis]
        if not isinstance(size, int):
            raise g.fail(f"axis {axis} of {x!r} is not static, so its gradient cannot be built")
        taken = range(*slice(start, end, step).indices(size))
        if step == 1:
            pads[axis], pads[rank + axis] = (taken.start, size - taken.stop) if len(taken) else (size, 0)
        else:
            grad = _scatter_axis(g, grad, axis, size, list(taken), rank)
    if any(pads):
        grad = g.op("Pad", [grad, g.const(pads)], mode="constant")
    g.set_grad(0, grad)


def _scatter_axis(g: GradContext, grad: str, axis: int, size: int, taken: list[int], rank: int) -> str:
    """`grad` (len(taken) long on `axis`) scattered into zeros `size` long there, at the positions `taken`."""
    shape = g.op("Shape", [grad])
    parts = [g.op("Slice", [shape, g.const([0]), g.const([axis])])] if axis else []
    parts.append(g.const([size]))
    if axis + 1 < rank:
        parts.append(g.op("Slice", [shape, g.const([axis + 1]), g.const([rank])]))
    target = g.op("Concat", parts, axis=0) if len(parts) > 1 else parts[0]
    zero = helper.make_tensor("zero", g.elem_type(g.x(0)), [1], [0])
    zeros = g.op("ConstantOfShape", [target], value=zero)
    index_shape = [1] * rank
    index_shape[axis] = len(taken)
    indices = g.op("Expand", [g.const(np.array(taken, np.int64).reshape(index_shape)), shape])
    return g.op("ScatterElements", [zeros, indices, grad], axis=axis)
