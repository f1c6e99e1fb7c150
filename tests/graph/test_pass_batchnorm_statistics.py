"""BatchNormStatisticsPass: each training-mode BatchNorm's batch mean and inverse std become graph outputs
(numpy's batch statistics, where onnxruntime-training runs the op); BatchNorms it has no positions for, or
graphs without one, are untouched. training_bn_positions: H*W per training-mode BatchNorm."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_testing import from_text, snapshot

from onnx_neq.graph.passes.batchnorm_statistics import BatchNormStatisticsPass, training_bn_positions
from onnx_neq.ort_runtime import has_training

TRAINING_GRAPH = """<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[N, 3, 2, 2] x, float[3] s, float[3] b, float[3] rm, float[3] rv) => (float[N, 3, 2, 2] y) {
        y, nm, nv, bm, bi = com.microsoft.BatchNormInternal <epsilon = 0.001, momentum = 0.0, training_mode = 1> (x, s, b, rm, rv)
    }
"""
POSITIONS = {"rm": 4}


def _model() -> ir.Model:
    return ir.from_onnx_text(TRAINING_GRAPH)


def test_batch_statistics_become_outputs(rng):
    model = _model()
    result = BatchNormStatisticsPass(POSITIONS)(model)
    assert result.modified and [v.name for v in model.graph.outputs] == ["y", "bm", "bi"]
    expected = {"running_mean": "rm", "running_var": "rv", "batch_mean": "bm", "batch_inv_std": "bi", "positions": 4}
    assert result.report.stats == ({**expected, "epsilon": pytest.approx(1e-3)},)
    if not has_training():
        pytest.skip("BatchNormInternal runs in onnxruntime-training only")
    from onnx_neq.ort_runtime import inference_session

    x = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    feeds = {"x": x, "s": np.ones(3, np.float32), "b": np.zeros(3, np.float32), "rm": np.zeros(3, np.float32), "rv": np.ones(3, np.float32)}
    _, mean, inv_std = inference_session(ir.serde.serialize_model(model)).run(None, feeds)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(x.var(axis=(0, 2, 3)) + 1e-3), rtol=1e-4)


def test_without_positions_or_batchnorm_the_graph_is_untouched():
    plain = ir.from_onnx_text('<ir_version: 8, opset_import: ["" : 17]> g (float[N, 3] x) => (float[N, 3] y) { y = Relu (x) }')
    for model, positions in ((_model(), {}), (_model(), {"other": 4}), (plain, POSITIONS)):
        before = snapshot(model)
        result = BatchNormStatisticsPass(positions)(model)
        assert not result.modified and result.report.stats == ()
        assert snapshot(model) == before


def test_one_pass_object_twice_gives_the_same_result():
    stats = BatchNormStatisticsPass(POSITIONS)
    first, second = _model(), _model()
    a, b = stats(first), stats(second)
    assert a.modified and b.modified and a.report == b.report and len(a.report.stats) == 1
    assert snapshot(first) == snapshot(second)


def test_training_bn_positions_are_the_inferred_spatial_sizes():
    proto = ir.serde.serialize_model(
        from_text("""
            g (float[N, 3, 6, 5] x, float[3] s, float[3] b, float[3] m, float[3] v, float[N, 3, H, 5] z) => (float[N, 3, 3, 5] y, float[N, 3, H, 5] w) {
                p = MaxPool <kernel_shape = [2, 1], strides = [2, 1]> (x)
                y, m1, v1 = BatchNormalization <training_mode = 1> (p, s, b, m, v)
                q = BatchNormalization (p, s, b, m, v)
                w, m2, v2 = BatchNormalization <training_mode = 1> (z, s, b, v, m)
            }
        """)
    )
    inferred = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    assert training_bn_positions(inferred) == {"m": 3 * 5}  # not the inference one, nor the one of unknown height
