"""The pruning entropy of each layer, measured through the eval graph, against the activations PyTorch computes
for the same model in eval mode (the ReLU inputs, caught by forward hooks), turned into entropy here by hand."""

from __future__ import annotations

import copy

import numpy as np
import torch

from onnx_neq.backends.base import PORTABLE, open_backend
from onnx_neq.data.datasets import Split
from onnx_neq.manifest import read_manifest
from onnx_neq.training.entropy import EntropyProbe


def _hand_entropy(x: np.ndarray) -> float:
    """Mean binary entropy (bits) over the channels with 0 < p < 1 of x > 0 (x: N, C, H, W)."""
    p = (x > 0).mean(axis=(0, 2, 3))
    inside = p[(p > 0) & (p < 1)]
    return float(np.mean(-inside * np.log2(inside) - (1 - inside) * np.log2(1 - inside))) if inside.size else 0.0


def test_entropy_matches_torch_activations(tiny_onnx, tiny_artifacts, rng):
    manifest = read_manifest(tiny_artifacts)
    params = open_backend(PORTABLE, tiny_artifacts).parameters()
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)  # uint8 NHWC, as the data sets give them
    split = Split(images, np.zeros(40, np.int64))
    activity = EntropyProbe(tiny_artifacts, manifest, params).measure(params, split, batch_size=16)
    assert set(activity) == {"stem", "dw", "grouped"}  # every conv of the tiny model has its ReLU

    model = copy.deepcopy(tiny_onnx[1]).eval()
    caught: dict[str, list[np.ndarray]] = {"stem": [], "dw": [], "grouped": []}
    for name, bn in (("stem", model.bn1), ("dw", model.bn2), ("grouped", model.bn3)):
        bn.register_forward_hook(lambda m, i, out, name=name: caught[name].append(out.detach().numpy()))
    from onnx_neq.training.setup import prep

    for start in range(0, 40, 16):  # the same batches
        with torch.no_grad():
            model(torch.from_numpy(prep(manifest, images[start : start + 16])))
    for name, batches in caught.items():
        expected = np.mean([_hand_entropy(x) for x in batches])
        assert abs(activity[name].value - expected) < 1e-9, name
        on = np.concatenate(batches) > 0
        assert np.array_equal(activity[name].entropy.always_on, on.all(axis=(0, 2, 3)))
        assert np.array_equal(activity[name].always_below, (~on).all(axis=(0, 2, 3)))
