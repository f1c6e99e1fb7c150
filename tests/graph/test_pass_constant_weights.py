"""ConstantWeightsPass: Constant / ConstantOfShape outputs become initializers holding the same values
(onnxruntime on the original graph is the reference); graphs without them are untouched."""

from __future__ import annotations

import numpy as np
from graph_testing import from_text, run_ort, snapshot

from onnx_neq.graph.passes.constant_weights import ConstantWeightsPass

CONSTANTS = """
    g (float[N, 3] x) => (float[N, 2] y) <int64[2] s = {3, 2}> {
        w = Constant <value = float[3, 2] {0.5, -1.0, 2.0, 0.25, -0.75, 1.5}> ()
        k = Constant <value_float = 0.5> ()
        z = ConstantOfShape <value = float[1] {0.125}> (s)
        v = Add (w, z)
        m = MatMul (x, v)
        y = Mul (m, k)
    }
"""


def test_constant_weights_become_initializers_with_the_same_values(rng):
    original, model = from_text(CONSTANTS), from_text(CONSTANTS)
    result = ConstantWeightsPass()(model)
    assert result.modified and result.report.lifted == ("w", "k", "z")
    assert [n.op_type for n in model.graph] == ["Add", "MatMul", "Mul"]
    assert all(name in model.graph.initializers for name in ("w", "k", "z"))
    x = rng.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(model, {"x": x})[0], run_ort(original, {"x": x})[0])


def test_graph_outputs_and_computed_shapes_are_left_alone():
    """No Constant at all; a Constant that is a graph output; a ConstantOfShape of a computed shape."""
    texts = [
        "g (float[N, 3] x) => (float[N, 3] y) { y = Relu (x) }",
        "g (float[N, 3] x) => (float[N, 3] y, float[2] c) { y = Relu (x)\n c = Constant <value = float[2] {1.0, 2.0}> () }",
        "g (float[N, 3] x) => (float[N, 3] y) { s = Shape (x)\n y = ConstantOfShape <value = float[1] {1.0}> (s) }",
    ]
    for text in texts:
        model = from_text(text)
        before = snapshot(model)
        result = ConstantWeightsPass()(model)
        assert not result.modified and result.report.lifted == ()
        assert snapshot(model) == before


def test_one_pass_object_twice_gives_the_same_result():
    lift = ConstantWeightsPass()
    first, second = from_text(CONSTANTS), from_text(CONSTANTS)
    a, b = lift(first), lift(second)
    assert a.modified and b.modified and a.report == b.report
    assert snapshot(first) == snapshot(second)
    again = lift(first)
    assert not again.modified and again.report.lifted == ()
