"""OutputActivationPass: a Softmax / LogSoftmax at the output (possibly behind ops that keep the values) goes,
the logits become the output (the original output is their softmax, by hand), and append_output_activation puts
it back (the original output again, in onnxruntime); other graphs are untouched."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graph_testing import from_text, run_ort, snapshot

from onnx_neq.graph.passes.output_activation import OutputActivationPass, append_output_activation

SOFTMAX = """
    g (float[N, 3] x) => (float[N, 3] y) <float[3, 3] w = {{0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 1.0, 0.0, -0.5}}> {{
        l = MatMul (x, w)
        s = {op} <axis = 1> (l)
        y = Identity (s)
    }}
"""


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_the_output_activation_goes_and_comes_back(op, rng):
    original, model = from_text(SOFTMAX.format(op=op)), from_text(SOFTMAX.format(op=op))
    result = OutputActivationPass()(model)
    assert result.modified and result.report.removed == {"op": op, "axis": 1, "output": "y"}
    assert [n.op_type for n in model.graph] == ["MatMul"] and model.graph.outputs[0].name == "l"
    x = rng.standard_normal((4, 3)).astype(np.float32)
    logits, expected = run_ort(model, {"x": x})[0], run_ort(original, {"x": x})[0]
    activated = _softmax(logits) if op == "Softmax" else np.log(_softmax(logits))
    np.testing.assert_allclose(activated, expected, rtol=1e-5, atol=1e-6)
    restored = append_output_activation(ir.serde.serialize_model(model), result.report.removed)
    np.testing.assert_allclose(run_ort(restored, {"x": x})[0], expected, rtol=1e-6, atol=1e-7)


def test_no_activation_or_one_read_elsewhere_is_untouched():
    texts = [
        "g (float[N, 3] x) => (float[N, 3] y) { y = Relu (x) }",
        "g (float[N, 3] x) => (float[N, 3] y, float[N, 3] t) { y = Softmax (x)\n t = Identity (y) }",  # the output is read
        "g (float[N, 3] x) => (float[N, 3] y) { y = Softmax (x) }",  # of the graph input: no logits to output
    ]
    for text in texts:
        model = from_text(text)
        before = snapshot(model)
        result = OutputActivationPass()(model)
        assert not result.modified and result.report.removed is None
        assert snapshot(model) == before


def test_one_pass_object_twice_gives_the_same_result():
    strip = OutputActivationPass()
    first, second = from_text(SOFTMAX.format(op="Softmax")), from_text(SOFTMAX.format(op="Softmax"))
    a, b = strip(first), strip(second)
    assert a.modified and b.modified and a.report == b.report
    assert snapshot(first) == snapshot(second)
    again = strip(first)
    assert not again.modified and again.report.removed is None  # not the last call's activation
