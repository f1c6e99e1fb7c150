"""Two moves every rewriting pass makes: add a constant, and hand a node's output to a new value."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register `array` as an initializer named `name` and return its value."""
    array = np.asarray(array)
    value = ir.Value(
        name=name,
        const_value=ir.tensor(array, name=name),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
    )
    graph.register_initializer(value)
    return value


def take_over(old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` everywhere (graph outputs too) under old's name, type and shape."""
    name, old.name = old.name, f"{old.name}.replaced"
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    new.name, new.type, new.shape = name, new.type or old.type, new.shape or old.shape
