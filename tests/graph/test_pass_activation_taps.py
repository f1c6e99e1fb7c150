"""ActivationTapPass: the raw output of every Conv layer becomes an extra graph output (by hand: a 1x1 conv is an
einsum), the other outputs unchanged; without layers the graph is untouched."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graph_testing import floats, from_text, run_ort, snapshot

from onnx_neq.errors import NeqError
from onnx_neq.graph.conv_layers import find_conv_layers
from onnx_neq.graph.passes.activation_taps import ActivationTapPass


def _conv_model() -> ir.Model:
    return from_text(
        f"""
        g (float[N, 3, 4, 4] x) => (float[N, 2] y)
          <float[6, 3, 1, 1] w = {{{floats(18, 0)}}}, float[6] b = {{{floats(6, 1)}}}, float[2, 6] fc = {{{floats(12, 2)}}}> {{
            c = Conv (x, w, b)
            r = Relu (c)
            p = GlobalAveragePool (r)
            f = Flatten (p)
            y = Gemm <transB = 1> (f, fc)
        }}
        """,
        {"w": "conv.weight", "b": "conv.bias"},
    )


def test_the_raw_conv_output_is_exposed(rng):
    model = _conv_model()
    w, b, fc = (model.graph.initializers[k].const_value.numpy() for k in ("conv.weight", "conv.bias", "fc"))
    result = ActivationTapPass(find_conv_layers(model))(model)
    assert result.modified and result.report.taps == ("conv.neq_tap",)
    assert [v.name for v in model.graph.outputs] == ["y", "conv.neq_tap"]
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    y, tap = run_ort(model, {"x": x})
    expected = np.einsum("oi,nihw->nohw", w[:, :, 0, 0], x) + b[None, :, None, None]  # the 1x1 conv by hand
    np.testing.assert_allclose(tap, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, np.maximum(expected, 0).mean(axis=(2, 3)) @ fc.T, rtol=1e-5, atol=1e-6)


def test_no_layers_leave_the_graph_untouched():
    model = _conv_model()
    before = snapshot(model)
    result = ActivationTapPass([])(model)
    assert not result.modified and result.report.taps == ()
    assert snapshot(model) == before


def test_a_layer_whose_output_is_gone_is_named():
    model, layers = _conv_model(), find_conv_layers(_conv_model())
    model.graph.node(0).outputs[0].name = "renamed"
    with pytest.raises(NeqError, match="lost the output of Conv"):
        ActivationTapPass(layers)(model)


def test_one_pass_object_twice_gives_the_same_result():
    first, second = _conv_model(), _conv_model()
    taps = ActivationTapPass(find_conv_layers(first))
    a, b = taps(first), taps(second)
    assert a.modified and b.modified and a.report == b.report == taps(_conv_model()).report
    assert snapshot(first) == snapshot(second)
