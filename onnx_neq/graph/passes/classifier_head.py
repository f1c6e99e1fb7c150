"""ClassifierHeadPass: a freshly initialized classifier head with N outputs.

Before:  logits = Gemm(features, W[K, F], b[K])         (or MatMul(features, W[F, K]) + b[K],
                                                         or a 1x1 Conv head W[K, F, 1, 1], b[K])
After:   the same op with W'[N, F(, 1, 1)], b'[N]       W', b' ~ U(-1/sqrt(F), 1/sqrt(F)), as torch.nn.Linear

The head is the Gemm/MatMul that the first graph output is computed from, possibly through ops
that keep the values (Identity, Cast to the same type, Flatten, Reshape, Squeeze: `keeps_values`).
Its initializers are replaced in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_neq.errors import NeqError
from onnx_neq.graph.conv_layers import find_head_conv, keeps_values
from onnx_neq.graph.passes._result import ReportedResult


@dataclass(frozen=True)
class ClassifierHeadReport:
    replaced: tuple[int, int]  # (old classes, new classes)


class ClassifierHeadPass(ir.passes.InPlacePass):
    def __init__(self, num_classes: int, seed: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.seed = seed

    def call(self, model: ir.Model) -> ReportedResult[ClassifierHeadReport]:
        rng = np.random.default_rng(self.seed)  # per call: equal models get equal heads
        conv = find_head_conv(model)
        node = conv if conv is not None else _head(model.graph)
        weight, bias, transposed = _weight_and_bias(node)
        w = weight.const_value.numpy()
        features, old = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        bound = 1.0 / np.sqrt(features)
        new_w = rng.uniform(-bound, bound, (self.num_classes, features)).astype(w.dtype)
        _replace(weight, new_w.reshape(self.num_classes, features, *w.shape[2:]) if transposed else new_w.T.copy())
        _replace(bias, rng.uniform(-bound, bound, self.num_classes).astype(w.dtype))
        first = node.inputs[_matmul_input(node)].producer() if node.op_type == "Add" else node  # MatMul + Add: from the MatMul on
        _set_class_dim(first.outputs[0], old, self.num_classes)
        return ReportedResult(model, True, ClassifierHeadReport((old, self.num_classes)))


def _head(graph: ir.Graph) -> ir.Node:
    value = graph.outputs[0]
    while value.producer() is not None and (keeps_values(value.producer()) or value.producer().op_type == "Add"):
        node = value.producer()
        if node.op_type == "Add" and _matmul_input(node) is not None:
            return node
        value = node.inputs[0]
    node = value.producer()
    if node is None or node.op_type != "Gemm":
        raise NeqError("--num-classes: no Gemm or MatMul+Add classifier found before the model's output; replace the head before exporting")
    return node


def _matmul_input(add: ir.Node) -> int | None:
    """Which input of an Add (0 or 1) a MatMul with a constant weight produces (bias + x @ W is common too)."""
    for index, value in enumerate(add.inputs[:2]):
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "MatMul" and producer.inputs[1].const_value is not None:
            return index
    return None


def _weight_and_bias(node: ir.Node) -> tuple[ir.Value, ir.Value, bool]:
    if node.op_type == "Conv":
        weight, bias, transposed = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None, True
    elif node.op_type == "Add":
        index = _matmul_input(node)
        weight, bias, transposed = node.inputs[index].producer().inputs[1], node.inputs[1 - index], False
    else:
        if node.attributes.get_int("transA", 0):
            raise NeqError(f"--num-classes: Gemm '{node.name}' has transA=1, which onnx-neq does not rewrite")
        weight, transposed = node.inputs[1], bool(node.attributes.get_int("transB", 0))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    if weight is None or weight.const_value is None or bias is None or bias.const_value is None:
        raise NeqError(f"--num-classes: the head '{node.name}' needs an initializer weight and bias")
    return weight, bias, transposed


def _set_class_dim(start: ir.Value, old: int, classes: int) -> None:
    """The head's output and everything computed from it carry the class count in dim 1 (a Reshape
    to a constant shape naming the old count in dim 1 too)."""
    todo, seen = [start], set()
    while todo:
        value = todo.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.shape is not None and value.shape.rank() >= 2:
            value.shape = ir.Shape([value.shape[0], classes, *value.shape[2:]])
        for consumer, _ in value.uses():
            _retarget_reshape(consumer, old, classes)
            todo.extend(consumer.outputs)


def _retarget_reshape(node: ir.Node, old: int, classes: int) -> None:
    target = node.inputs[1] if node.op_type == "Reshape" and len(node.inputs) > 1 else None
    if target is None or target.const_value is None or not target.is_initializer():
        return
    shape = target.const_value.numpy().copy()
    if shape.ndim == 1 and shape.size >= 2 and shape[1] == old and len(target.uses()) == 1:
        shape[1] = classes
        _replace(target, shape)


def _replace(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
