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

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_neq.graph.passes._result import ReportedResult
from onnx_neq.graph.passes._splice import splice, take_over


@dataclass(frozen=True)
class BatchNormAffineReport:
    rewritten: tuple[str, ...]  # the rewritten BatchNorms' names (the prefix of the ops that replace each)


class BatchNormAffinePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ReportedResult[BatchNormAffineReport]:
        graph = model.graph
        rewritten: list[str] = []
        for node in list(graph):
            if node.op_type == "BatchNormalization" and not node.attributes.get_int("training_mode", 0) and len(node.outputs) == 1:
                rewritten.append(_rewrite(graph, node, node.name or f"bn{len(rewritten)}"))
        return ReportedResult(model, bool(rewritten), BatchNormAffineReport(tuple(rewritten)))


def _rewrite(graph: ir.Graph, node: ir.Node, name: str) -> str:
    x, scale, bias, mean, var = node.inputs[:5]
    rank = x.shape.rank() if x.shape is not None else 4
    eps = node.attributes.get_float("epsilon", 1e-5)
    tape = ir.tape.Tape()
    shape = tape.initializer(ir.tensor(np.array([1, -1] + [1] * (rank - 2), np.int64), name=f"{name}.affine_shape"))
    epsilon = tape.initializer(ir.tensor(np.array(eps, np.float32), name=f"{name}.epsilon"))

    def op(op_type: str, *inputs: ir.Value, suffix: str) -> ir.Value:
        return tape.op(op_type, list(inputs), name=f"{name}.{suffix}", output=ir.Value(name=f"{name}.{suffix}"))

    k = op("Div", scale, op("Sqrt", op("Add", var, epsilon, suffix="var_eps"), suffix="std"), suffix="k")
    centered = op("Sub", x, op("Reshape", mean, shape, suffix="mean4d"), suffix="centered")
    scaled = op("Mul", centered, op("Reshape", k, shape, suffix="k4d"), suffix="scaled")
    out = op("Add", scaled, op("Reshape", bias, shape, suffix="bias4d"), suffix="affine")
    splice(graph, tape, before=node)
    out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
    take_over(node.outputs[0], out)
    graph.remove(node, safe=True)
    return name
