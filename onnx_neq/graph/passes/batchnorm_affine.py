"""BatchNormAffinePass: inference-mode BatchNormalization as explicit, differentiable affine ops.

Before:  Y = BatchNormalization[training_mode=0](X, scale, bias, mean, var)
After:   k = scale / Sqrt(var + epsilon)
         Y = (X - Reshape(mean)) * Reshape(k) + Reshape(bias)      (Reshape to [1, C, 1, 1])

onnxruntime-training 1.19.2 differentiates an inference-mode BatchNormalization as if it used
batch statistics (the bias gradient comes out exactly 0). With running statistics frozen, the
layer is this affine map, and ORT differentiates the explicit ops correctly: scale and bias get
their true gradients, mean and var stay frozen initializers.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_neq.graph.passes._values import add_initializer, take_over


class BatchNormAffinePass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.rewritten: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for node in list(graph):
            if node.op_type == "BatchNormalization" and not node.attributes.get_int("training_mode", 0) and len(node.outputs) == 1:
                self._rewrite(graph, node)
        return ir.passes.PassResult(model, modified=bool(self.rewritten))

    def _rewrite(self, graph: ir.Graph, node: ir.Node) -> None:
        x, scale, bias, mean, var = node.inputs[:5]
        rank = x.shape.rank() if x.shape is not None else 4
        name = node.name or f"bn{len(self.rewritten)}"
        eps = node.attributes.get_float("epsilon", 1e-5)
        shape = add_initializer(graph, f"{name}.affine_shape", np.array([1, -1] + [1] * (rank - 2), np.int64))
        epsilon = add_initializer(graph, f"{name}.epsilon", np.array(eps, np.float32))
        nodes = []

        def op(op_type: str, *inputs: ir.Value, suffix: str) -> ir.Value:
            n = ir.node(op_type, list(inputs), name=f"{name}.{suffix}")
            n.outputs[0].name = f"{name}.{suffix}"
            nodes.append(n)
            return n.outputs[0]

        k = op("Div", scale, op("Sqrt", op("Add", var, epsilon, suffix="var_eps"), suffix="std"), suffix="k")
        centered = op("Sub", x, op("Reshape", mean, shape, suffix="mean4d"), suffix="centered")
        scaled = op("Mul", centered, op("Reshape", k, shape, suffix="k4d"), suffix="scaled")
        out = op("Add", scaled, op("Reshape", bias, shape, suffix="bias4d"), suffix="affine")
        graph.insert_before(node, nodes)
        out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
        take_over(node.outputs[0], out)
        graph.remove(node, safe=True)
        self.rewritten.append(name)
