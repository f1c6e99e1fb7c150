"""Manifest totals for the torchvision-shaped models, against counts computed by hand here."""

from __future__ import annotations

import pytest

from onnx_neq.export import export
from onnx_neq.graph.prepare import prepare


def _resnet_basic_hand_count() -> tuple[int, int]:
    """ResNet-18: stem, 2 BasicBlocks per stage (two 3x3 convs), 1x1 downsample in stages 2-4."""
    params = 3 * 7 * 7 * 64
    neurons = 64
    c_in = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            params += c_in * 9 * width + width * 9 * width
            neurons += 2 * width
            if block == 0 and c_in != width:
                params += c_in * width
                neurons += width
            c_in = width
    return params, neurons


def _resnet_bottleneck_hand_count() -> tuple[int, int]:
    """ResNet-50: stem, [3, 4, 6, 3] Bottlenecks (1x1, 3x3, 1x1 x4), 1x1 downsample per stage."""
    params, neurons, c_in = 3 * 7 * 7 * 64, 64, 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for block in range(blocks):
            params += c_in * width + width * 9 * width + width * 4 * width
            neurons += width + width + 4 * width
            if block == 0:
                params += c_in * 4 * width
                neurons += 4 * width
            c_in = 4 * width
    return params, neurons


def _mobilenet_v2_hand_count() -> tuple[int, int]:
    """MobileNetV2 1.0: stem 3x3, per block [1x1 expand], 3x3 depthwise (kh*kw per neuron), 1x1 project; last 1x1 to 1280."""
    params, neurons, c_in = 3 * 9 * 32, 32, 32
    for t, c, n in [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]:
        for _ in range(n):
            hidden = c_in * t
            if t != 1:
                params += c_in * hidden
                neurons += hidden
            params += 9 * hidden
            neurons += hidden
            params += hidden * c
            neurons += c
            c_in = c
    params += c_in * 1280
    neurons += 1280
    return params, neurons


CASES = {
    # arch: (selectable_params, neurons, bn_params, classifier_params at 1000 classes, hand count)
    "resnet18": (11_166_912, 4_800, 9_600, 513_000, _resnet_basic_hand_count),
    "mobilenet_v2": (2_189_760, 17_056, 34_112, 1_281_000, _mobilenet_v2_hand_count),
    "resnet50": (23_454_912, 26_560, 53_120, 2_049_000, _resnet_bottleneck_hand_count),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_manifest_totals_match_hand_counts(arch, tmp_path):
    params, neurons, bn, classifier, hand = CASES[arch]
    assert hand() == (params, neurons)  # the table in ALGORITHM.md agrees with the hand count
    onnx_path = tmp_path / f"{arch}.onnx"
    export(arch, onnx_path, resolution=32)
    manifest = prepare(onnx_path, tmp_path / "art").manifest
    assert manifest.selectable_params == params
    assert manifest.neurons == neurons
    assert manifest.bn_params == bn
    assert manifest.classifier_params == classifier
    assert sum(layer.out_channels * layer.neuron_cost for layer in manifest.layers) == params
    expected_convs = {"resnet18": 20, "mobilenet_v2": 52, "resnet50": 53}[arch]
    assert len(manifest.layers) == expected_convs


def test_mobilenet_v2_depthwise_cost_is_kernel_area(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    export("mobilenet_v2", onnx_path, resolution=32, width_mult=0.35, num_classes=10)
    manifest = prepare(onnx_path, tmp_path / "art").manifest
    depthwise = [layer for layer in manifest.layers if layer.kind == "depthwise"]
    assert len(depthwise) == 17
    assert all(layer.neuron_cost == 9 for layer in depthwise)
    assert manifest.num_classes == 10
