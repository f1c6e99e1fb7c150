"""Each graph pass on a tiny graph built here: what changed, and the numbers against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnx_neq.graph.conv_layers import find_conv_layers
from onnx_neq.graph.passes.activation_taps import ActivationTapPass
from onnx_neq.graph.passes.batchnorm_affine import BatchNormAffinePass
from onnx_neq.graph.passes.batchnorm_inference import BatchNormInferencePass
from onnx_neq.graph.passes.dropout_removal import DropoutRemovalPass
from onnx_neq.graph.passes.gradient_masks import GradientMaskPass
from onnx_neq.ort_runtime import inference_session

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return inference_session(proto).run(None, feeds)


def _floats(n: int, seed: int) -> str:
    return ", ".join(f"{v:.4f}" for v in np.random.default_rng(seed).standard_normal(n))


def _rename(model: ir.Model, names: dict[str, str]) -> ir.Model:
    """The text format has no dots in identifiers; give values exporter-style names afterwards."""
    values = {v.name: v for node in model.graph for v in [*node.inputs, *node.outputs] if v is not None}
    values.update(model.graph.initializers)
    for old, new in names.items():
        values[old].name = new
    return model


def _conv_model() -> ir.Model:
    model = ir.from_onnx_text(
        HEADER
        + f"""
        g (float[N, 3, 4, 4] x) => (float[N, 2] y)
          <float[6, 3, 1, 1] w = {{{_floats(18, 0)}}}, float[6] b = {{{_floats(6, 1)}}}, float[2, 6] fc = {{{_floats(12, 2)}}}> {{
            c = Conv <group = 1> (x, w, b)
            r = Relu (c)
            p = GlobalAveragePool (r)
            f = Flatten (p)
            y = Gemm <transB = 1> (f, fc)
        }}
        """
    )
    return _rename(model, {"w": "conv.weight", "b": "conv.bias"})


def test_find_conv_layers_costs_and_names():
    layers = find_conv_layers(_conv_model())
    assert [(l.name, l.kind, l.out_channels, l.neuron_cost) for l in layers] == [("conv", "conv", 6, 3 * 1 * 1 + 1)]
    assert layers[0].mask_input == "conv.neq_mask" and not layers[0].mask_input.endswith("_grad")


def test_gradient_mask_pass_multiplies_gradients_by_channel_mask():
    # A stand-in for ORT's training graph: gradients produced by a node, read by accumulators.
    model = ir.from_onnx_text(
        HEADER
        + """
        g (float[N, 3, 4, 4] x, int64[N] labels, float[6, 3, 1, 1] gw, float[6] gb) => (float[6, 3, 1, 1] acc_w, float[6] acc_b) {
            wg = Identity (gw)
            bg = Identity (gb)
            acc_w = Identity (wg)
            acc_b = Identity (bg)
        }
        """
    )
    _rename(model, {"wg": "conv.weight_grad", "bg": "conv.bias_grad"})
    layers = find_conv_layers(_conv_model())
    masks = GradientMaskPass(layers, ["x", "labels"])
    result = masks(model)
    assert result.modified
    assert [v.name for v in model.graph.inputs][:3] == ["x", "labels", "conv.neq_mask"]
    rng = np.random.default_rng(1)
    gw, gb = rng.standard_normal((6, 3, 1, 1)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 0], np.float32)
    feeds = {"x": np.zeros((1, 3, 4, 4), np.float32), "labels": np.zeros(1, np.int64), "conv.neq_mask": mask, "gw": gw, "gb": gb}
    acc_w, acc_b = _run(model, feeds)
    np.testing.assert_array_equal(acc_w, gw * mask[:, None, None, None])
    np.testing.assert_array_equal(acc_b, gb * mask)
    assert masks.report.masked_gradients == 2


def test_activation_tap_pass_exposes_raw_conv_outputs():
    model = _conv_model()
    w = model.graph.initializers["conv.weight"].const_value.numpy()
    b = model.graph.initializers["conv.bias"].const_value.numpy()
    fc = model.graph.initializers["fc"].const_value.numpy()
    taps = ActivationTapPass(find_conv_layers(model))
    taps(model)
    assert [v.name for v in model.graph.outputs] == ["y", "conv.neq_tap"]
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4)).astype(np.float32)
    y, tap = _run(model, {"x": x})
    expected = np.einsum("oi,nihw->nohw", w[:, :, 0, 0], x) + b[None, :, None, None]  # 1x1 conv by hand
    np.testing.assert_allclose(tap, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, np.maximum(expected, 0).mean(axis=(2, 3)) @ fc.T, rtol=1e-5, atol=1e-6)


def test_a_1x1_conv_feeding_the_output_is_the_classifier_not_neurons():
    """SqueezeNet-style: Conv 1x1 -> Relu -> GlobalAveragePool -> output is the head."""
    from onnx_neq.graph.conv_layers import find_head_conv

    model = ir.from_onnx_text(
        HEADER
        + f"""
        g (float[N, 3, 4, 4] x) => (float[N, 6] y) <float[6, 3, 1, 1] w = {{{_floats(18, 0)}}}> {{
            c = Conv (x, w)
            r = Relu (c)
            p = GlobalAveragePool (r)
            y = Flatten (p)
        }}
        """
    )
    assert find_head_conv(model) is not None and find_conv_layers(model) == []


BN_TEXT = """
    g (float[N, 3, 2, 2] x, float[3] s, float[3] b, float[3] m, float[3] v) => (float[N, 3, 2, 2] y) {
        y = BatchNormalization <epsilon = 0.001> (x, s, b, m, v)
    }
"""


def _bn_reference(x, s, b, m, v, eps=1e-3):
    shape = (1, -1, 1, 1)
    return (x - m.reshape(shape)) / np.sqrt(v.reshape(shape) + eps) * s.reshape(shape) + b.reshape(shape)


def _bn_feeds():
    rng = np.random.default_rng(3)
    return {
        "x": rng.standard_normal((2, 3, 2, 2)).astype(np.float32),
        "s": rng.standard_normal(3).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
        "m": rng.standard_normal(3).astype(np.float32),
        "v": rng.uniform(0.5, 2, 3).astype(np.float32),
    }


def test_batchnorm_inference_pass_drops_training_outputs():
    text = BN_TEXT.replace(
        "y = BatchNormalization <epsilon = 0.001>", "y, rm, rv = BatchNormalization <epsilon = 0.001, training_mode = 1>"
    )
    model = ir.from_onnx_text(HEADER + text)
    bn = BatchNormInferencePass()
    bn(model)
    node = next(iter(model.graph))
    assert bn.changed == 1 and len(node.outputs) == 1 and "training_mode" not in node.attributes
    feeds = _bn_feeds()
    np.testing.assert_allclose(_run(model, feeds)[0], _bn_reference(**feeds), rtol=1e-5, atol=1e-6)


def test_batchnorm_affine_pass_is_the_same_function():
    model = ir.from_onnx_text(HEADER + BN_TEXT)
    affine = BatchNormAffinePass()
    affine(model)
    assert affine.rewritten and not any(n.op_type == "BatchNormalization" for n in model.graph)
    feeds = _bn_feeds()
    np.testing.assert_allclose(_run(model, feeds)[0], _bn_reference(**feeds), rtol=1e-5, atol=1e-6)


def test_dropout_removal_pass():
    model = ir.from_onnx_text(
        HEADER
        + """
        g (float[N, 4] x) => (float[N, 4] y) {
            ratio = Constant <value = float {0.5}> ()
            train = Constant <value = bool {1}> ()
            d, mask = Dropout (x, ratio, train)
            y = Relu (d)
        }
        """
    )
    drop = DropoutRemovalPass()
    drop(model)
    assert drop.removed == 1 and not any(n.op_type == "Dropout" for n in model.graph)
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(model, {"x": x})[0], np.maximum(x, 0))
