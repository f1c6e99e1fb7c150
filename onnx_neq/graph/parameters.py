"""Sort a model's initializers into the groups the manifest counts apart.

selectable: Conv weights and biases (masked per output channel)
bn: BatchNormalization scale and bias (always trained, not counted against the budget)
classifier: Gemm / MatMul weights and the bias added after them, or a 1x1 Conv head (always trained)
other: any other float parameter of a differentiable op (PRelu slopes, norm scales)
frozen: BatchNorm running statistics and every remaining float initializer
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnx_neq.graph.conv_layers import ConvLayer, find_head_conv

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
_TRAINABLE_SLOTS = {
    "PRelu": (1,),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2),
}


@dataclass
class ParameterGroups:
    selectable: list[str] = field(default_factory=list)
    bn: list[str] = field(default_factory=list)
    classifier: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def trainable(self) -> list[str]:
        return self.selectable + self.bn + self.classifier + self.other

    def count(self, group: str) -> int:
        return sum(self.sizes[n] for n in getattr(self, group))


def group_parameters(model: ir.Model, layers: list[ConvLayer]) -> ParameterGroups:
    """Classify every float initializer of the main graph."""
    graph = model.graph
    groups = ParameterGroups()
    floats = {name: v for name, v in graph.initializers.items() if v.const_value is not None and v.dtype in _FLOAT}
    groups.sizes = {name: int(np.prod(v.const_value.shape)) for name, v in floats.items()}
    taken: set[str] = set()

    def take(group: list[str], value: ir.Value | None) -> None:
        if value is not None and value.name in floats and value.name not in taken:
            group.append(value.name)
            taken.add(value.name)

    for layer in layers:
        take(groups.selectable, graph.initializers[layer.weight])
        if layer.bias:
            take(groups.selectable, graph.initializers[layer.bias])
    head = find_head_conv(model)
    for value in head.inputs[1:3] if head is not None else []:
        take(groups.classifier, value)
    for node in graph:
        for value in _slots(node, "bn"):
            take(groups.bn, value)
        for value in _slots(node, "classifier"):
            take(groups.classifier, value)
        for value in _slots(node, "other"):
            take(groups.other, value)
    groups.frozen = [n for n in floats if n not in taken]
    return groups


def _slots(node: ir.Node, group: str) -> list[ir.Value | None]:
    op = node.op_type
    if group == "bn":
        return list(node.inputs[1:3]) if op == "BatchNormalization" else []
    if group == "classifier":
        if op == "Gemm":
            return list(node.inputs[1:3])
        if op == "MatMul" and node.inputs[1] is not None and node.inputs[1].is_initializer():
            return [node.inputs[1], *_bias_after(node)]
        return []
    return [node.inputs[i] for i in _TRAINABLE_SLOTS.get(op, ()) if i < len(node.inputs)]


def _bias_after(matmul: ir.Node) -> list[ir.Value]:
    out = []
    for consumer, _ in matmul.outputs[0].uses():
        if consumer.op_type == "Add":
            out += [v for v in consumer.inputs if v is not None and v.is_initializer()]
    return out
