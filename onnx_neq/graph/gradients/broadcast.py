"""Sum a gradient down to the shape of an input that was broadcast (ONNX's numpy rules).

With known shapes, the axes are found here, as ORT's ComputeBroadcastBackwardAxes finds them: every
leading axis the input lacks, and every axis where the input has 1 and the output does not. Leading
axes alone reduce with keepdims=0, axes of an input of the same rank with keepdims=1; both kinds
together with keepdims=1 and a Reshape to the input's shape.
Where a dim is unknown or two symbolic dims differ, the axes are computed in the graph from the two
Shapes (standard ops; ORT would emit its own BroadcastGradientArgs there).
"""

from __future__ import annotations

from onnx_neq.graph.gradients.context import GradContext, dims_equal


def unbroadcast(g: GradContext, grad: str, like: str, target: str) -> str:
    """`grad` (shaped as value `like`) summed to the shape of `target`."""
    t_shape, g_shape = g.shape(target), g.shape(like)
    lead = len(g_shape) - len(t_shape)
    if lead < 0:
        raise g.fail(f"{target!r} has a higher rank than the output it broadcasts to")
    axes, known = list(range(lead)), True
    for i, (t, d) in enumerate(zip(t_shape, g_shape[lead:])):
        if dims_equal(t, d):
            continue
        if t == 1:
            axes.append(lead + i)  # also where the output's dim is symbolic: a sum over one element is exact
        else:
            known = False
    if not known:
        return _dynamic(g, grad, target, len(g_shape))
    if not axes:
        return grad
    if axes == list(range(lead)):
        return g.op("ReduceSum", [grad, g.const(axes)], keepdims=0)
    summed = g.op("ReduceSum", [grad, g.const(axes)], keepdims=1)
    return summed if lead == 0 else reshape_to(g, summed, target)  # same rank: keepdims gave the target's shape


def reshape_to(g: GradContext, value: str, target: str) -> str:
    """Reshape `value` to `target`'s shape: a constant shape where it is static, else Shape(target)."""
    static = g.static_shape(target)
    shape = g.const(static) if static is not None else g.op("Shape", [target])
    return g.op("Reshape", [value, shape])


def _dynamic(g: GradContext, grad: str, target: str, rank_g: int) -> str:
    """The reduction axes computed from Shape(grad) and Shape(target) in the graph."""
    rank_t = g.rank(target)
    t_shape = g.op("Shape", [target])
    if rank_g > rank_t:
        t_shape = g.op("Concat", [g.const([1] * (rank_g - rank_t)), t_shape], axis=0)
    one = g.const([1])
    is_one = g.op("Equal", [t_shape, one])
    grad_not_one = g.op("Not", [g.op("Equal", [g.op("Shape", [grad]), one])])
    axes = g.op("Reshape", [g.op("NonZero", [g.op("And", [is_one, grad_not_one])]), g.const([-1])])
    summed = g.op("ReduceSum", [grad, axes], keepdims=1, noop_with_empty_axes=1)
    return g.op("Reshape", [summed, g.op("Shape", [target])])
