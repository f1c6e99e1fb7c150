"""ClassifierHeadPass: the head (Gemm, MatMul + Add, or a 1x1 Conv) gets N classes and fresh weights drawn as
documented (seeded numpy, U(-1/sqrt(F), 1/sqrt(F)) as torch.nn.Linear), everything else unchanged. It always
replaces the head it finds (so always modifies); a model without a head is refused and left untouched."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graph_testing import floats, from_text, run_ort, snapshot

from onnx_neq.errors import NeqError
from onnx_neq.graph.passes.classifier_head import ClassifierHeadPass

GEMM = """
    g (float[N, 6] x) => (float[N, 4] y) <float[4, 6] w = {{{w}}}, float[4] b = {{{b}}}> {{
        h = Gemm <transB = 1> (x, w, b)
        y = Identity (h)
    }}
"""
MATMUL_ADD = """
    g (float[N, 6] x) => (float[N, 4] y) <float[6, 4] w = {{{w}}}, float[4] b = {{{b}}}> {{
        m = MatMul (x, w)
        y = Add (b, m)
    }}
"""
CONV = """
    g (float[N, 6, 2, 2] x) => (float[N, 4] y) <float[4, 6, 1, 1] w = {{{w}}}, float[4] b = {{{b}}}> {{
        c = Conv (x, w, b)
        p = GlobalAveragePool (c)
        y = Flatten (p)
    }}
"""


def _head(classes: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """W [classes, features] and b as documented: seeded numpy, uniform in +-1/sqrt(features), weight first."""
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(features)
    return rng.uniform(-bound, bound, (classes, features)).astype(np.float32), rng.uniform(-bound, bound, classes).astype(np.float32)


def _head_model(text: str) -> ir.Model:
    return from_text(text.format(w=floats(24, 0), b=floats(4, 1)))


@pytest.mark.parametrize("text", [GEMM, MATMUL_ADD, CONV], ids=["gemm", "matmul_add", "conv"])
def test_the_head_gets_fresh_weights_for_n_classes(text, rng):
    model = _head_model(text)
    result = ClassifierHeadPass(3, seed=5)(model)
    assert result.modified and result.report.replaced == (4, 3)
    assert model.graph.outputs[0].shape[1] == 3
    w, b = _head(3, 6, seed=5)
    x = rng.standard_normal((2, 6, 2, 2) if text is CONV else (2, 6)).astype(np.float32)
    features = x.mean(axis=(2, 3)) if text is CONV else x  # a 1x1 conv commutes with the average pool
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], features @ w.T + b, rtol=1e-5, atol=1e-6)


def test_a_model_without_a_head_is_refused_untouched():
    model = from_text("g (float[N, 6] x) => (float[N, 6] y) { y = Relu (x) }")
    before = snapshot(model)
    with pytest.raises(NeqError, match="no Gemm or MatMul"):
        ClassifierHeadPass(3)(model)
    assert snapshot(model) == before


def test_one_pass_object_twice_gives_equal_heads():
    """The generator starts from the seed in every call: equal models get equal heads."""
    head = ClassifierHeadPass(3, seed=7)
    first, second = _head_model(GEMM), _head_model(GEMM)
    a, b = head(first), head(second)
    assert a.report == b.report and snapshot(first) == snapshot(second)
    np.testing.assert_array_equal(second.graph.initializers["w"].const_value.numpy(), _head(3, 6, seed=7)[0])
