"""BatchNormAffinePass: an inference-mode BatchNormalization becomes explicit affine ops computing the same
function (numpy's BatchNorm formula); training-mode ones and graphs without BatchNorm are untouched."""

from __future__ import annotations

import numpy as np
from graph_testing import batchnorm_feeds, batchnorm_reference, from_text, run_ort, snapshot

from onnx_neq.graph.passes.batchnorm_affine import BatchNormAffinePass

BN = """
    g (float[N, 3, 2, 2] x, float[3] s, float[3] b, float[3] m, float[3] v) => (float[N, 3, 2, 2] y) {
        y = BatchNormalization <epsilon = 0.001> (x, s, b, m, v)
    }
"""
TWO_UNNAMED = """
    g (float[N, 3, 2, 2] x, float[3] s, float[3] b, float[3] m, float[3] v) => (float[N, 3, 2, 2] y) {
        h = BatchNormalization (x, s, b, m, v)
        y = BatchNormalization (h, s, b, m, v)
    }
"""


def test_an_inference_batchnorm_becomes_the_same_affine_function(rng):
    model = from_text(BN)
    result = BatchNormAffinePass()(model)
    assert result.modified and len(result.report.rewritten) == 1
    assert not any(n.op_type == "BatchNormalization" for n in model.graph)
    assert [n.op_type for n in model.graph] == ["Add", "Sqrt", "Div", "Reshape", "Sub", "Reshape", "Mul", "Reshape", "Add"]
    feeds = batchnorm_feeds(rng)
    np.testing.assert_allclose(run_ort(model, feeds)[0], batchnorm_reference(**feeds), rtol=1e-5, atol=1e-6)


def test_training_mode_and_no_batchnorm_are_untouched():
    training = from_text(BN.replace("y = BatchNormalization <epsilon = 0.001>", "y, rm, rv = BatchNormalization <training_mode = 1>"))
    plain = from_text("g (float[N, 3] x) => (float[N, 3] y) { y = Relu (x) }")
    for model in (training, plain):
        before = snapshot(model)
        result = BatchNormAffinePass()(model)
        assert not result.modified and result.report.rewritten == ()
        assert snapshot(model) == before


def test_one_pass_object_twice_names_unnamed_batchnorms_alike(rng):
    affine = BatchNormAffinePass()
    first, second = from_text(TWO_UNNAMED), from_text(TWO_UNNAMED)
    for node in [*first.graph, *second.graph]:
        node.name = ""
    a, b = affine(first), affine(second)
    assert a.report.rewritten == b.report.rewritten == ("bn0", "bn1")  # numbered per call, not per pass object
    assert snapshot(first) == snapshot(second)
    feeds = batchnorm_feeds(rng)
    expected = batchnorm_reference(batchnorm_reference(**feeds, eps=1e-5), *(feeds[k] for k in "sbmv"), eps=1e-5)
    np.testing.assert_allclose(run_ort(second, feeds)[0], expected, rtol=1e-5, atol=1e-5)
