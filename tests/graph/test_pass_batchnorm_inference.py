"""BatchNormInferencePass: a BatchNormalization with training outputs nobody reads becomes its single-output
inference form (numpy's BatchNorm formula on running statistics); one already in that form, or whose running
statistics are read, is untouched."""

from __future__ import annotations

import numpy as np
from graph_testing import batchnorm_feeds, batchnorm_reference, from_text, run_ort, snapshot

from onnx_neq.graph.passes.batchnorm_inference import BatchNormInferencePass

INFERENCE = """
    g (float[N, 3, 2, 2] x, float[3] s, float[3] b, float[3] m, float[3] v) => (float[N, 3, 2, 2] y) {
        y = BatchNormalization <epsilon = 0.001> (x, s, b, m, v)
    }
"""
TRAINING = INFERENCE.replace(
    "y = BatchNormalization <epsilon = 0.001>", "y, rm, rv = BatchNormalization <epsilon = 0.001, training_mode = 1>"
)


def test_training_outputs_nobody_reads_are_dropped(rng):
    model = from_text(TRAINING)
    result = BatchNormInferencePass()(model)
    node = next(iter(model.graph))
    assert result.modified and result.report.changed == 1
    assert len(node.outputs) == 1 and "training_mode" not in node.attributes
    feeds = batchnorm_feeds(rng)
    np.testing.assert_allclose(run_ort(model, feeds)[0], batchnorm_reference(**feeds), rtol=1e-5, atol=1e-6)


def test_an_inference_batchnorm_or_read_statistics_are_untouched():
    read = from_text(TRAINING.replace("=> (float[N, 3, 2, 2] y)", "=> (float[N, 3, 2, 2] y, float[3] rm)"))
    for model in (from_text(INFERENCE), read):
        before = snapshot(model)
        result = BatchNormInferencePass()(model)
        assert not result.modified and result.report.changed == 0
        assert snapshot(model) == before


def test_one_pass_object_twice_gives_the_same_result():
    fix = BatchNormInferencePass()
    first, second = from_text(TRAINING), from_text(TRAINING)
    a, b = fix(first), fix(second)
    assert a.modified and b.modified and a.report == b.report
    assert snapshot(first) == snapshot(second)
    again = fix(first)  # already fixed: a count that never resets would say modified
    assert not again.modified and again.report.changed == 0
