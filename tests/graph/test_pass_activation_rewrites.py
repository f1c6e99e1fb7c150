"""ActivationRewritePass: every op without an ORT gradient becomes exact differentiable ops (onnxruntime on the
original graph is the reference); graphs without such ops, or forms it leaves alone, come back untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from graph_testing import from_text, run_ort, snapshot

from onnx_neq.graph.passes.activation_rewrites import ActivationRewritePass

CHAIN = """
    g (float[N, 4, 5, 5] x) => (float[N, 4, 1, 1] y) <float[4, 1, 1] slope = {0.1, -0.2, 0.3, 0.05}> {
        a = HardSwish (x)
        b = HardSigmoid <alpha = 0.3, beta = 0.4> (a)
        c = Softplus (x)
        d = Elu <alpha = 0.7> (c)
        e = PRelu (x, slope)
        f = Sum (b, d, e)
        l = LRN <size = 3, alpha = 0.001, beta = 0.6, bias = 1.5> (f)
        p = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 0> (l)
        y = GlobalMaxPool (p)
    }
"""
EVERY_OP = ("HardSwish", "HardSigmoid", "Softplus", "Elu", "PRelu", "Sum", "LRN", "AveragePool", "GlobalMaxPool")


def _chain() -> ir.Model:
    """The chain with onnx's inferred shapes, as prepare has them (LRN and AveragePool need static sizes)."""
    proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(from_text(CHAIN)))
    return ir.serde.deserialize_model(proto)


def test_every_op_is_rewritten_into_the_same_function(rng):
    original = _chain()
    model = _chain()
    result = ActivationRewritePass()(model)
    assert result.modified and result.model is model
    assert result.report.rewritten == dict.fromkeys(EVERY_OP, 1)
    assert not {n.op_type for n in model.graph} & set(EVERY_OP)
    x = (rng.standard_normal((2, 4, 5, 5)) * 4).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, 60.0, -60.0]  # Softplus / Elu where a naive form overflows
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], run_ort(original, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_graph_without_such_ops_is_untouched():
    model = from_text("""
        g (float[N, 4, 5, 5] x) => (float[N, 4, 5, 5] y) {
            r = Relu (x)
            y = Sigmoid (r)
        }
    """)
    before = snapshot(model)
    result = ActivationRewritePass()(model)
    assert not result.modified and result.report.rewritten == {}
    assert snapshot(model) == before


def test_an_lrn_of_unknown_channel_count_is_left_as_it_is():
    model = from_text("""
        g (float[N, C, 5, 5] x) => (float[N, C, 5, 5] y) {
            y = LRN <size = 3> (x)
        }
    """)
    before = snapshot(model)
    result = ActivationRewritePass()(model)
    assert not result.modified and result.report.rewritten == {}
    assert snapshot(model) == before


def test_one_pass_object_twice_gives_the_same_result():
    rewrite = ActivationRewritePass()
    first, second = _chain(), _chain()
    a, b = rewrite(first), rewrite(second)
    assert a.report == b.report and a.modified and b.modified
    assert snapshot(first) == snapshot(second)
    again = rewrite(first)  # nothing left to rewrite: nothing carried over from the calls before
    assert not again.modified and again.report.rewritten == {}
