"""The registry: forward op type -> its gradient rule and the inputs that can carry a gradient.

A rule takes a GradContext for one forward node and emits standard-ONNX nodes that compute the
gradients of the inputs it is asked for. Inputs outside `inputs` (shapes, axes, indices, bounds, the
exponent of Pow) are stop edges, as in ORT's gradient builder. An op type with no entry that lies on a
path from a trained parameter to the loss ends `prepare` with one line naming it and its nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onnx_neq.graph.gradients import elementwise as ew
from onnx_neq.graph.gradients import layers, shape_ops
from onnx_neq.graph.gradients.context import GradContext


@dataclass(frozen=True)
class GradRule:
    fn: Callable[[GradContext], None]
    inputs: tuple[int, ...] | None = None  # the inputs that can carry a gradient; None: every input


RULES: dict[str, GradRule] = {
    # layers
    "Conv": GradRule(layers.conv, (0, 1, 2)),
    "BatchNormalization": GradRule(layers.batch_norm, (0, 1, 2)),
    "Gemm": GradRule(layers.gemm, (0, 1, 2)),
    "MatMul": GradRule(layers.matmul, (0, 1)),
    "SoftmaxCrossEntropyLoss": GradRule(layers.softmax_cross_entropy, (0,)),
    # pooling and reductions
    "MaxPool": GradRule(layers.max_pool, (0,)),
    "AveragePool": GradRule(layers.average_pool, (0,)),
    "GlobalAveragePool": GradRule(layers.global_average_pool, (0,)),
    "ReduceMean": GradRule(layers.reduce_mean, (0,)),
    "ReduceSum": GradRule(layers.reduce_sum, (0,)),
    "ReduceMax": GradRule(layers.reduce_max, (0,)),
    # activations
    "Relu": GradRule(ew.relu, (0,)),
    "LeakyRelu": GradRule(ew.leaky_relu, (0,)),
    "Sigmoid": GradRule(ew.sigmoid, (0,)),
    "Tanh": GradRule(ew.tanh, (0,)),
    "Clip": GradRule(ew.clip, (0,)),
    "Softmax": GradRule(ew.softmax, (0,)),
    "LogSoftmax": GradRule(ew.log_softmax, (0,)),
    # arithmetic
    "Add": GradRule(ew.add, (0, 1)),
    "Sub": GradRule(ew.sub, (0, 1)),
    "Mul": GradRule(ew.mul, (0, 1)),
    "Div": GradRule(ew.div, (0, 1)),
    "Pow": GradRule(ew.pow_, (0,)),
    "Sum": GradRule(ew.sum_),
    "Neg": GradRule(ew.neg, (0,)),
    "Exp": GradRule(ew.exp, (0,)),
    "Log": GradRule(ew.log, (0,)),
    "Sqrt": GradRule(ew.sqrt, (0,)),
    "Reciprocal": GradRule(ew.reciprocal, (0,)),
    "Abs": GradRule(ew.abs_, (0,)),
    "Identity": GradRule(ew.identity, (0,)),
    "Cast": GradRule(ew.cast, (0,)),
    # moving values
    "Reshape": GradRule(shape_ops.reshape, (0,)),
    "Flatten": GradRule(shape_ops.reshape, (0,)),
    "Squeeze": GradRule(shape_ops.reshape, (0,)),
    "Unsqueeze": GradRule(shape_ops.reshape, (0,)),
    "Transpose": GradRule(shape_ops.transpose, (0,)),
    "Expand": GradRule(shape_ops.expand, (0,)),
    "Concat": GradRule(shape_ops.concat),
    "Split": GradRule(shape_ops.split, (0,)),
    "Slice": GradRule(shape_ops.slice_, (0,)),
    "Pad": GradRule(shape_ops.pad, (0,)),
}

# Ops whose outputs never carry a gradient (integer, boolean or shape results, constants). Piecewise-constant
# float ops (Sign, Round, Floor, Ceil) are not here: a trained parameter behind one would never learn, so
# prepare names them instead.
NO_GRADIENT = frozenset(
    {
        "Shape", "Size", "Constant", "ConstantOfShape", "Range", "NonZero", "ArgMax", "ArgMin", "Equal", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "OneHot",
    }
)  # fmt: skip
