"""ActivationInputPass: each conv's activation input becomes a graph output (by hand: conv, then per-channel
scale and shift), Clip's bounds are read, a residual Add pairs the branch's conv and not the shortcut's, and a
conv that reaches no activation is left unpaired; without pairs the graph is untouched."""

from __future__ import annotations

import numpy as np
from graph_testing import floats, from_text, run_ort, snapshot

from onnx_neq.graph.conv_layers import find_conv_layers
from onnx_neq.graph.passes.activation_inputs import ActivationInputPass


def _block() -> object:
    """conv a (1x1) -> scale/shift -> Clip(0, 6) -> conv b (1x1) -> + shortcut conv s of x -> Relu; conv p -> no activation."""
    return from_text(
        f"""
        g (float[N, 3, 4, 4] x) => (float[N, 2, 4, 4] y, float[N, 2, 4, 4] q)
          <float[2, 3, 1, 1] wa = {{{floats(6, 0)}}}, float[1, 2, 1, 1] k = {{0.5, 2.0}}, float[1, 2, 1, 1] sh = {{0.1, -0.2}},
           float[2, 2, 1, 1] wb = {{{floats(4, 1)}}}, float[2, 3, 1, 1] ws = {{{floats(6, 2)}}}, float[2, 3, 1, 1] wp = {{{floats(6, 3)}}},
           float lo = {{0.0}}, float hi = {{6.0}}> {{
            a = Conv (x, wa)
            m = Mul (a, k)
            z = Add (m, sh)
            c = Clip (z, lo, hi)
            b = Conv (c, wb)
            s = Conv (x, ws)
            t = Add (b, s)
            y = Relu (t)
            q = Conv (x, wp)
        }}
        """,
        {"wa": "a.weight", "wb": "b.weight", "ws": "s.weight", "wp": "p.weight"},
    )


def test_activation_inputs_are_exposed_and_paired(rng):
    model = _block()
    values = {k: model.graph.initializers[k].const_value.numpy() for k in ("a.weight", "b.weight", "s.weight", "k", "sh")}
    result = ActivationInputPass(find_conv_layers(model), "x")(model)
    report = result.report
    assert result.modified
    by_layer = {p.layer: p for p in report.paired}
    assert set(by_layer) == {"a", "b"} and set(report.unpaired) == {"s", "p"}  # s: the shortcut; p: no activation
    assert (by_layer["a"].op, by_layer["a"].low, by_layer["a"].high, by_layer["a"].residual) == ("Clip", 0.0, 6.0, False)
    assert (by_layer["b"].op, by_layer["b"].residual) == ("Relu", True)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    outputs = dict(zip([v.name for v in model.graph.outputs], run_ort(model, {"x": x})))
    conv = lambda w, v: np.einsum("oi,nihw->nohw", w[:, :, 0, 0], v)  # noqa: E731  a 1x1 conv by hand
    z = conv(values["a.weight"], x) * values["k"] + values["sh"]
    np.testing.assert_allclose(outputs["a.neq_act"], z, rtol=1e-5, atol=1e-6)
    t = conv(values["b.weight"], np.clip(z, 0, 6)) + conv(values["s.weight"], x)
    np.testing.assert_allclose(outputs["b.neq_act"], t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["y"], np.maximum(t, 0), rtol=1e-5, atol=1e-6)  # the model's own outputs unchanged


def test_clip_bounds_fed_as_parameters_are_read_from_them():
    model = _block()
    for name in ("lo", "hi"):  # as the eval graph holds them: graph inputs whose values are parameters
        model.graph.initializers.pop(name)
    result = ActivationInputPass(find_conv_layers(model), "x", {"lo": np.array([0.0], np.float32), "hi": np.array([6.0], np.float32)})(
        model
    )
    paired = {p.layer: p for p in result.report.paired}
    assert (paired["a"].low, paired["a"].high) == (0.0, 6.0)


def test_no_pairs_leave_the_graph_untouched():
    model = _block()
    before = snapshot(model)
    layers = [layer for layer in find_conv_layers(model) if layer.name in ("s", "p")]
    result = ActivationInputPass(layers, "x")(model)
    assert not result.modified and result.report.paired == () and set(result.report.unpaired) == {"s", "p"}
    assert snapshot(model) == before
