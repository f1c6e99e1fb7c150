"""ConstantWeightsPass: weights produced by Constant / ConstantOfShape nodes become initializers.

Before:  W = Constant <value = T> ()                 (Paddle, TensorFlow exporters)
         W = ConstantOfShape <value = v> (S)         (S an initializer; onnx's test zoo)
After:   W is an initializer holding T, or full(S, v); the nodes are gone

Every such node whose output is not a graph output is lifted; unused inputs and initializers left
behind are removed by the steps that run after this one.

Not onnx-ir's LiftConstantsToInitializersPass, which differs here: it also lifts the Constants inside
If / Loop / Scan bodies (into initializers of those subgraphs, which this pass leaves alone), has no
ConstantOfShape, keeps the attribute's own tensor encoding (float_data stays float_data, where this
pass writes raw bytes as before) and reports no count or names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_neq.graph.passes._result import ReportedResult

_SCALAR_ATTRS = {"value_float": np.float32, "value_int": np.int64, "value_floats": np.float32, "value_ints": np.int64}


@dataclass(frozen=True)
class ConstantWeightsReport:
    lifted: tuple[str, ...]  # the new initializers' names (the lifted values' names)


class ConstantWeightsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedResult[ConstantWeightsReport]:
        graph = model.graph
        tape = ir.tape.Tape(graph)
        lifted = []
        for node in list(graph):
            array = _constant_value(node)
            if array is None or node.outputs[0].is_graph_output():
                continue
            out = node.outputs[0]
            name, out.name = out.name, out.name + ".folded"
            value = tape.initializer(ir.tensor(array, name=name))
            out.replace_all_uses_with(value)
            graph.remove(node, safe=True)
            lifted.append(name)
        return ReportedResult(model, bool(lifted), ConstantWeightsReport(tuple(lifted)))


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
