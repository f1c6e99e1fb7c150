"""ConstantWeightsPass: weights produced by Constant / ConstantOfShape nodes become initializers.

Before:  W = Constant <value = T> ()                 (Paddle, TensorFlow exporters)
         W = ConstantOfShape <value = v> (S)         (S an initializer; onnx's test zoo)
After:   W is an initializer holding T, or full(S, v); the nodes are gone

Only values consumed by some node are lifted; unused inputs and initializers left behind are
removed by the passes that run after this one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_SCALAR_ATTRS = {"value_float": np.float32, "value_int": np.int64, "value_floats": np.float32, "value_ints": np.int64}


class ConstantWeightsPass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.lifted: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for node in list(graph):
            array = _constant_value(node)
            if array is None or node.outputs[0].is_graph_output():
                continue
            out = node.outputs[0]
            value = ir.Value(
                name=out.name,
                const_value=ir.tensor(array, name=out.name),
                type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                shape=ir.Shape(array.shape),
            )
            out.name = out.name + ".folded"
            out.replace_all_uses_with(value)
            graph.remove(node, safe=True)
            graph.register_initializer(value)
            self.lifted.append(value.name)
        return ir.passes.PassResult(model, modified=bool(self.lifted))


def _constant_value(node: ir.Node) -> np.ndarray | None:
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op_type == "Constant":
        if "value" in node.attributes:
            return np.asarray(node.attributes["value"].as_tensor().numpy())
        for name, dtype in _SCALAR_ATTRS.items():
            if name in node.attributes:
                return np.asarray(node.attributes[name].value, dtype=dtype)
        return None
    if node.op_type == "ConstantOfShape":
        shape = node.inputs[0]
        if shape is None or shape.const_value is None:
            return None
        fill = node.attributes["value"].as_tensor().numpy().reshape(-1) if "value" in node.attributes else np.zeros(1, np.float32)
        return np.full(tuple(int(d) for d in shape.const_value.numpy().reshape(-1)), fill[0], dtype=fill.dtype)
    return None
