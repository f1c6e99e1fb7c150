"""flops_saved's count (graph/specialize.py BackwardCount) against a hand count of backward MACs per image.

The model: 8x8 input; stem 3->4 3x3; depthwise 4 3x3; strided 4->6 3x3 stride 2 (4x4 out); pointwise 6->8;
each with BatchNorm + ReLU; global pool; classifier 8->5. Per image, a conv whose output is Ho x Wo with
weight [Cout, Cin/g, kh, kw] costs Ho*Wo*(Cin/g)*kh*kw MACs per output channel for its weight gradient, and
Cout times that for its input gradient; the classifier costs 8*5 for its weight gradient and 8*5 for its
input gradient (needed whenever something below it trains).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from onnx_neq.graph.specialize import BackwardCount, load_training_graph
from onnx_neq.manifest import read_manifest

PER_CHANNEL = {"stem": 64 * 3 * 9, "dw": 64 * 1 * 9, "down": 16 * 4 * 9, "pw": 16 * 6 * 1}
CHANNELS = {"stem": 4, "dw": 4, "down": 6, "pw": 8}
HEAD = 40  # the classifier's weight gradient
HEAD_DX = 40


def _dx(name: str) -> int:
    return PER_CHANNEL[name] * CHANNELS[name]


FULL = HEAD + HEAD_DX + sum(2 * _dx(n) for n in ("dw", "down", "pw")) + _dx("stem")  # no gradient of the image


class Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.dw, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
        self.down, self.bn3 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.pw, self.bn4 = nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        for conv, bn in ((self.stem, self.bn1), (self.dw, self.bn2), (self.down, self.bn3), (self.pw, self.bn4)):
            x = torch.relu(bn(conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def strided(tmp_path_factory):
    from onnx_neq.export import export_module
    from onnx_neq.graph.prepare import prepare

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("strided")
    export_module(Strided(), root / "m.onnx", resolution=8)
    prepare(root / "m.onnx", root / "art")
    manifest = read_manifest(root / "art")
    return load_training_graph(root / "art", manifest), manifest


def _masks(manifest, trained: dict[str, int]) -> dict[str, np.ndarray]:
    """Layer masks with the first `trained[short name]` channels on (a name absent: none)."""
    out = {}
    for layer in manifest.layers:
        short = next(n for n in CHANNELS if layer.weight.startswith(n + "."))
        out[layer.name] = (np.arange(layer.out_channels) < trained.get(short, 0)).astype(np.float32)
    return out


CASES = {
    # frozen prefix (stem, depthwise) and a partly frozen strided conv; BatchNorm with its channels: the backward stops at `down`
    "prefix_selected": ("selected", {"down": 2, "pw": 8}, HEAD + HEAD_DX + 2 * _dx("pw") + 2 * PER_CHANNEL["down"]),
    # the same selection with BatchNorm always trained: input gradients reach the stem's BatchNorm (no weight gradients below `down`)
    "prefix_always": ("always", {"down": 2, "pw": 8}, HEAD + HEAD_DX + 2 * _dx("pw") + _dx("down") + 2 * PER_CHANNEL["down"] + _dx("dw")),
    # a partly frozen depthwise conv: one channel's weight gradient; the input gradient through `down` to reach it
    "depthwise_some": ("selected", {"dw": 1, "down": 6, "pw": 8}, HEAD + HEAD_DX + 2 * _dx("pw") + 2 * _dx("down") + PER_CHANNEL["dw"]),
    "nothing": ("selected", {}, HEAD),
    "everything": ("selected", dict(CHANNELS), FULL),
}


@pytest.mark.parametrize("case", CASES)
def test_backward_macs_and_flops_saved_equal_a_hand_count(strided, case):
    model, manifest = strided
    bn_update, trained, expected = CASES[case]
    count = BackwardCount(model, manifest, bn_update)
    assert count.full == FULL
    masks = _masks(manifest, trained)
    assert count.macs(masks) == expected
    assert count.saved(masks) == pytest.approx(1 - expected / FULL)
