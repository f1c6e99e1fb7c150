"""GradientMaskPass: on a stand-in for ORT's training graph, each Conv layer's gradients reach their readers
times a new per-channel mask input (by hand: gradient * mask); without layers the graph is untouched."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graph_testing import floats, from_text, run_ort, snapshot

from onnx_neq.errors import NeqError
from onnx_neq.graph.conv_layers import find_conv_layers
from onnx_neq.graph.passes.gradient_masks import GradientMaskPass

# gradients produced by a node and read by accumulators, as in ORT's training graph
TRAINING = """
    g (float[N, 3, 4, 4] x, int64[N] labels, float[6, 3, 1, 1] gw, float[6] gb) => (float[6, 3, 1, 1] acc_w, float[6] acc_b) {
        wg = Identity (gw)
        bg = Identity (gb)
        acc_w = Identity (wg)
        acc_b = Identity (bg)
    }
"""


@pytest.fixture
def layers():
    forward = from_text(
        f"""
        g (float[N, 3, 4, 4] x) => (float[N, 2] y)
          <float[6, 3, 1, 1] w = {{{floats(18, 0)}}}, float[6] b = {{{floats(6, 1)}}}, float[2, 6] fc = {{{floats(12, 2)}}}> {{
            c = Conv (x, w, b)
            p = GlobalAveragePool (c)
            f = Flatten (p)
            y = Gemm <transB = 1> (f, fc)
        }}
        """,
        {"w": "conv.weight", "b": "conv.bias"},
    )
    return find_conv_layers(forward)


def _training() -> ir.Model:
    return from_text(TRAINING, {"wg": "conv.weight_grad", "bg": "conv.bias_grad"})


def test_gradients_are_multiplied_by_the_channel_mask(layers, rng):
    model = _training()
    result = GradientMaskPass(layers, ["x", "labels"])(model)
    assert result.modified and result.report.mask_inputs == ("conv.neq_mask",) and result.report.masked_gradients == 2
    assert [v.name for v in model.graph.inputs][:3] == ["x", "labels", "conv.neq_mask"]
    gw, gb = rng.standard_normal((6, 3, 1, 1)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 0], np.float32)
    feeds = {"x": np.zeros((1, 3, 4, 4), np.float32), "labels": np.zeros(1, np.int64), "conv.neq_mask": mask, "gw": gw, "gb": gb}
    acc_w, acc_b = run_ort(model, feeds)
    np.testing.assert_array_equal(acc_w, gw * mask[:, None, None, None])
    np.testing.assert_array_equal(acc_b, gb * mask)


def test_no_layers_leave_the_graph_untouched():
    model = _training()
    before = snapshot(model)
    result = GradientMaskPass([], ["x", "labels"])(model)
    assert not result.modified and result.report.mask_inputs == () and result.report.masked_gradients == 0
    assert snapshot(model) == before


def test_a_missing_gradient_or_user_input_is_named(layers):
    with pytest.raises(NeqError, match="lacks the inputs"):
        GradientMaskPass(layers, ["x", "targets"])(_training())
    model = _training()
    model.graph.node(0).outputs[0].name = "other"
    with pytest.raises(NeqError, match="no gradient for 'conv.weight'"):
        GradientMaskPass(layers, ["x", "labels"])(model)


def test_one_pass_object_twice_gives_the_same_result(layers):
    masks = GradientMaskPass(layers, ["x", "labels"])
    first, second = _training(), _training()
    a, b = masks(first), masks(second)
    assert a.modified and b.modified and a.report == b.report and a.report.masked_gradients == 2
    assert snapshot(first) == snapshot(second)
    assert isinstance(first.graph.initializers["conv.neq_mask.shape4"], ir.Value)
