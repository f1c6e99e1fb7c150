"""Pointwise and softmax-family gradients, plus com.microsoft Scale and DivGrad."""

from __future__ import annotations

from onnx_neq.errors import NeqError
from onnx_neq.graph.lowering.builder import Builder


def lower_relu_grad(b: Builder) -> None:
    """ReluGrad(dY, Y) -> Where(Y > 0, dY, 0)."""
    dy, y = b.input(0), b.input(1)
    zero = b.scalar(0.0, dy)
    b.op("Where", [b.op("Greater", [y, zero]), dy, zero], [b.output(0)])


def lower_sigmoid_grad(b: Builder) -> None:
    """SigmoidGrad(dY, Y) -> dY * Y * (1 - Y)."""
    dy, y = b.input(0), b.input(1)
    b.op("Mul", [b.op("Mul", [dy, y]), b.op("Sub", [b.scalar(1.0, y), y])], [b.output(0)])


def lower_scale(b: Builder) -> None:
    """Scale(X, s) -> Mul(X, s), or Div(X, s) when scale_down=1 (s cast to X's type)."""
    x, s = b.input(0), b.input(1)
    if b.elem_type(s) != b.elem_type(x):
        s = b.op("Cast", [s], to=b.elem_type(x))
    b.op("Div" if b.attr("scale_down", 0) else "Mul", [x, s], [b.output(0)])


def lower_softmax_grad_13(b: Builder) -> None:
    """SoftmaxGrad_13(dY, Y, axis) -> Y * (dY - ReduceSum(dY * Y, axis))."""
    dy, y = b.input(0), b.input(1)
    axis = b.attr("axis", -1)
    dot = b.op("ReduceSum", [b.op("Mul", [dy, y]), b.const([axis])], keepdims=1)
    b.op("Mul", [y, b.op("Sub", [dy, dot])], [b.output(0)])


def lower_log_softmax_grad_13(b: Builder) -> None:
    """LogSoftmaxGrad_13(dY, Y=log_softmax, axis) -> dY - Exp(Y) * ReduceSum(dY, axis)."""
    dy, y = b.input(0), b.input(1)
    total = b.op("ReduceSum", [dy, b.const([b.attr("axis", -1)])], keepdims=1)
    b.op("Sub", [dy, b.op("Mul", [b.op("Exp", [y]), total])], [b.output(0)])


def _coerced_2d(b: Builder, rule) -> None:
    """The opset<13 variants: flatten at `axis` to 2-D, apply `rule` on axis 1, reshape back."""
    dy, y = b.input(0), b.input(1)
    axis = b.attr("axis", 1)
    dy2, y2 = b.op("Flatten", [dy], axis=axis), b.op("Flatten", [y], axis=axis)
    inner = b.op("ReduceSum", [b.op("Mul", [dy2, y2]) if rule == "softmax" else dy2, b.const([1])], keepdims=1)
    if rule == "softmax":
        dx2 = b.op("Mul", [y2, b.op("Sub", [dy2, inner])])
    else:
        dx2 = b.op("Sub", [dy2, b.op("Mul", [b.op("Exp", [y2]), inner])])
    b.op("Reshape", [dx2, b.op("Shape", [dy])], [b.output(0)])


def lower_softmax_grad(b: Builder) -> None:
    """SoftmaxGrad(dY, Y, axis) (2-D coercion) -> Flatten, Y * (dY - ReduceSum(dY * Y, 1)), Reshape."""
    _coerced_2d(b, "softmax")


def lower_log_softmax_grad(b: Builder) -> None:
    """LogSoftmaxGrad(dY, Y, axis) (2-D coercion) -> Flatten, dY - Exp(Y) * ReduceSum(dY, 1), Reshape."""
    _coerced_2d(b, "logsoftmax")


def _unbroadcast(b: Builder, grad: str, target: str, out: str) -> None:
    """Sum `grad` (the broadcast output's shape) down to `target`'s shape, writing `out`."""
    t_shape, g_shape = b.shape(target), b.shape(b.input(0))
    padded = [1] * (len(g_shape) - len(t_shape)) + list(t_shape)
    axes = []
    for i, (t, g) in enumerate(zip(padded, g_shape)):
        if t == g and t is not None:
            continue
        if t == 1:
            axes.append(i)
        elif t is None or g is None:
            raise NeqError(f"{b.node.op_type} node {b.node.name!r}: cannot tell which axes broadcast ({t_shape} vs {g_shape})")
    if axes:
        grad = b.op("ReduceSum", [grad, b.const(axes)], keepdims=1)
    b.op("Reshape", [grad, b.op("Shape", [target])], [out])


def lower_div_grad(b: Builder) -> None:
    """DivGrad(dY, A, B) -> unbroadcast(dY / B) to A, unbroadcast(-dY * A / B^2) to B."""
    dy, a, bb = b.input(0), b.input(1), b.input(2)
    if b.output(0):
        _unbroadcast(b, b.op("Div", [dy, bb]), a, b.output(0))
    if b.output(1):
        quotient = b.op("Div", [b.op("Div", [b.op("Mul", [dy, a]), bb]), bb])
        _unbroadcast(b, b.op("Neg", [quotient]), bb, b.output(1))
