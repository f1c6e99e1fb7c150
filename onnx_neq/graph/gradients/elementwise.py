"""Gradients of pointwise ops and of Softmax/LogSoftmax (dY is the output's gradient, X the input).

Binary ops sum the gradient down to each input's shape (broadcast.unbroadcast). Relu, Sigmoid, Softmax
and LogSoftmax go through the lowering rules of ORT's ReluGrad, SigmoidGrad, SoftmaxGrad_13 and
LogSoftmaxGrad_13. Clip follows ORT: the gradient passes where min <= X <= max, bounds included
(PyTorch's hardtanh zeroes it on the bounds themselves; only inputs exactly on a bound differ).
"""

from __future__ import annotations

from onnx_neq.graph.gradients.broadcast import unbroadcast
from onnx_neq.graph.gradients.context import GradContext


def relu(g: GradContext) -> None:
    dx = g.fresh_like("dX", g.x(0))
    g.lowered("ReluGrad", [g.dy(), g.y(0)], [dx])
    g.set_grad(0, dx)


def leaky_relu(g: GradContext) -> None:
    """dY where X > 0, alpha * dY elsewhere."""
    dy, x = g.dy(), g.x(0)
    scaled = g.op("Mul", [dy, g.scalar(g.attr("alpha", 0.01), dy)])
    g.set_grad(0, g.op("Where", [g.op("Greater", [x, g.scalar(0.0, x)]), dy, scaled]))


def sigmoid(g: GradContext) -> None:
    dx = g.fresh_like("dX", g.x(0))
    g.lowered("SigmoidGrad", [g.dy(), g.y(0)], [dx])
    g.set_grad(0, dx)


def tanh(g: GradContext) -> None:
    """dY * (1 - Y^2)."""
    y = g.y(0)
    g.set_grad(0, g.op("Mul", [g.dy(), g.op("Sub", [g.scalar(1.0, y), g.op("Mul", [y, y])])]))


def clip(g: GradContext) -> None:
    """dY * (min <= X <= max), as ORT's Clip gradient (a missing bound is no bound)."""
    x, low, high = g.x(0), g.x(1), g.x(2)
    inside = [g.op("GreaterOrEqual", [x, low])] if low else []
    inside += [g.op("LessOrEqual", [x, high])] if high else []
    if not inside:
        g.set_grad(0, g.dy())
        return
    both = inside[0] if len(inside) == 1 else g.op("And", inside)
    g.set_grad(0, g.op("Mul", [g.dy(), g.op("Cast", [both], to=g.elem_type(x))]))


def softmax(g: GradContext) -> None:
    dx = g.fresh_like("dX", g.x(0))
    g.lowered("SoftmaxGrad_13", [g.dy(), g.y(0)], [dx], axis=g.attr("axis", -1))
    g.set_grad(0, dx)


def log_softmax(g: GradContext) -> None:
    dx = g.fresh_like("dX", g.x(0))
    g.lowered("LogSoftmaxGrad_13", [g.dy(), g.y(0)], [dx], axis=g.attr("axis", -1))
    g.set_grad(0, dx)


def identity(g: GradContext) -> None:
    g.set_grad(0, g.dy())


def cast(g: GradContext) -> None:
    """The gradient cast back to the input's type."""
    g.set_grad(0, g.op("Cast", [g.dy()], to=g.elem_type(g.x(0))))


def neg(g: GradContext) -> None:
    g.set_grad(0, g.op("Neg", [g.dy()]))


def exp(g: GradContext) -> None:
    g.set_grad(0, g.op("Mul", [g.dy(), g.y(0)]))


def log(g: GradContext) -> None:
    g.set_grad(0, g.op("Div", [g.dy(), g.x(0)]))


def sqrt(g: GradContext) -> None:
    """dY / (2 Y)."""
    g.set_grad(0, g.op("Div", [g.dy(), g.op("Mul", [g.y(0), g.scalar(2.0, g.y(0))])]))


def reciprocal(g: GradContext) -> None:
    """-dY * Y^2."""
    y = g.y(0)
    g.set_grad(0, g.op("Neg", [g.op("Mul", [g.dy(), g.op("Mul", [y, y])])]))


def abs_(g: GradContext) -> None:
    g.set_grad(0, g.op("Mul", [g.dy(), g.op("Sign", [g.x(0)])]))


def add(g: GradContext) -> None:
    for i in (0, 1):
        if g.needs(i):
            g.set_grad(i, unbroadcast(g, g.dy(), g.y(0), g.x(i)))


def sub(g: GradContext) -> None:
    if g.needs(0):
        g.set_grad(0, unbroadcast(g, g.dy(), g.y(0), g.x(0)))
    if g.needs(1):
        g.set_grad(1, unbroadcast(g, g.op("Neg", [g.dy()]), g.y(0), g.x(1)))


def mul(g: GradContext) -> None:
    """dA = dY * B and dB = dY * A, each summed to its input's shape (Mul(x, x) gives two contributions)."""
    for i in (0, 1):
        if g.needs(i):
            g.set_grad(i, unbroadcast(g, g.op("Mul", [g.dy(), g.x(1 - i)]), g.y(0), g.x(i)))


def div(g: GradContext) -> None:
    """dA = dY / B; dB = -(dY * A / B) / B (DivGrad's lowering order)."""
    dy, a, b = g.dy(), g.x(0), g.x(1)
    if g.needs(0):
        g.set_grad(0, unbroadcast(g, g.op("Div", [dy, b]), g.y(0), a))
    if g.needs(1):
        quotient = g.op("Div", [g.op("Div", [g.op("Mul", [dy, a]), b]), b])
        g.set_grad(1, unbroadcast(g, g.op("Neg", [quotient]), g.y(0), b))


def pow_(g: GradContext) -> None:
    """d/dX of X^p = p * X^(p-1) (the exponent gets no gradient, as in ORT)."""
    x, p = g.x(0), g.x(1)
    p_minus_1 = g.op("Sub", [p, g.scalar(1.0, p)])
    factor = p if g.elem_type(p) == g.elem_type(x) else g.op("Cast", [p], to=g.elem_type(x))
    slope = g.op("Mul", [g.op("Pow", [x, p_minus_1]), factor])
    g.set_grad(0, unbroadcast(g, g.op("Mul", [g.dy(), slope]), g.y(0), x))


def sum_(g: GradContext) -> None:
    for i in range(len(g.forward.input)):
        if g.needs(i):
            g.set_grad(i, unbroadcast(g, g.dy(), g.y(0), g.x(i)))
