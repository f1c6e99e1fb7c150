"""Inference models side by side: MACs by hand, non-zero MACs, nodes and latency present."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_neq.results.model_compare import compare_models, model_facts


def _model(path, zeros: int) -> None:
    """Conv 3->4, 3x3, pad 1 on 8x8 (4*3*9 = 108 weights, used at 64 positions), then Gemm 4*64 -> 5."""
    w = np.arange(1, 109, dtype=np.float32).reshape(4, 3, 3, 3)
    w.reshape(-1)[:zeros] = 0
    fc = np.ones((5, 256), np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_macs_and_nonzero_macs_by_hand(tmp_path):
    _model(tmp_path / "dense.onnx", 0)
    _model(tmp_path / "sparse.onnx", 54)
    dense, sparse = model_facts("d", tmp_path / "dense.onnx"), model_facts("s", tmp_path / "sparse.onnx")
    assert dense.macs == 108 * 64 + 5 * 256 == sparse.macs  # every weight once per output position
    assert dense.nonzero_macs == dense.macs
    assert sparse.nonzero_macs == 54 * 64 + 5 * 256  # half the conv weights are zero
    assert (dense.conv_layers, dense.nodes, dense.params, sparse.nonzero) == (1, 3, 108 + 1280, 54 + 1280)
    facts = compare_models({"d": tmp_path / "dense.onnx", "s": tmp_path / "sparse.onnx"}, repeats=5)
    assert all(f.latency_ms > 0 for f in facts)
