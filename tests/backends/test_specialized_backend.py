"""--backend specialized: the same SGD update as the masked portable backend on what trains, nothing
else moves, and the update memory is what the selection trains."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_neq.backends.base import PORTABLE, SPECIALIZED, open_backend
from onnx_neq.manifest import read_manifest


def _selection(manifest, rng) -> dict[str, np.ndarray]:
    """Layer 0 frozen, layer 1 fully trained, every other layer about half."""
    masks = {}
    for i, layer in enumerate(manifest.layers):
        mask = (rng.random(layer.out_channels) < 0.5).astype(np.float32)
        mask[0], mask[-1] = 1, 0
        masks[layer.name] = (
            np.zeros(layer.out_channels, np.float32) if i == 0 else np.ones(layer.out_channels, np.float32) if i == 1 else mask
        )
    return masks


@pytest.mark.parametrize("which", ["tiny", "shipped"])
def test_specialized_step_equals_masked_step(which, tiny_artifacts, rng):
    from onnx_neq.training.default_model import default_artifacts

    artifacts = tiny_artifacts if which == "tiny" else default_artifacts(5)
    manifest = read_manifest(artifacts)
    masks = _selection(manifest, rng)
    masked, special = open_backend(PORTABLE, artifacts), open_backend(SPECIALIZED, artifacts)
    masked.set_masks(masks)
    special.set_masks(masks)
    x = rng.standard_normal((6, *manifest.input.shape[1:])).astype(np.float32)
    y = rng.integers(0, manifest.num_classes, 6)
    before = masked.parameters()
    for backend in (masked, special):
        backend.train_step(x, y, 0.05)
    a, b = masked.parameters(), special.parameters()
    for layer in manifest.layers:
        trained = masks[layer.name] == 1
        for p in filter(None, (layer.weight, layer.bias)):
            assert np.array_equal(b[p][~trained], before[p][~trained]), p  # frozen rows untouched
            np.testing.assert_allclose(b[p][trained], a[p][trained], rtol=1e-5, atol=1e-7, err_msg=p)
    for p in manifest.always_trained:
        np.testing.assert_allclose(b[p], a[p], rtol=1e-5, atol=1e-7, err_msg=p)


@pytest.mark.parametrize("bn_update", ["always", "selected"])
def test_update_memory_is_the_selection(bn_update, tiny_artifacts, rng):
    """Gradient bytes = 4 x (selected conv parameters + classifier + BatchNorm: all, or the selected channels')."""
    manifest = read_manifest(tiny_artifacts)
    masks = _selection(manifest, rng)
    backend = open_backend(SPECIALIZED, tiny_artifacts, bn_update=bn_update)
    backend.set_masks(masks)
    conv = sum(int(masks[layer.name].sum()) * layer.neuron_cost for layer in manifest.layers)
    bn_all = sum(2 * layer.out_channels for layer in manifest.layers)  # every tiny conv has a BN after it
    bn = bn_all if bn_update == "always" else sum(2 * int(masks[layer.name].sum()) for layer in manifest.layers)
    classifier = 12 * 5 + 5
    assert backend.update_bytes() == 4 * (conv + classifier + bn)
    masked = open_backend(PORTABLE, tiny_artifacts)
    assert masked.update_bytes() == 4 * (sum(layer.params for layer in manifest.layers) + classifier + bn_all)
    assert backend.backward_macs() < masked.backward_macs()


def test_one_graph_per_tuple_of_states(tiny_artifacts, rng):
    """A selection with the states of the current graph reuses it (no build time added); other states build one."""
    manifest = read_manifest(tiny_artifacts)
    masks = _selection(manifest, rng)
    backend = open_backend(SPECIALIZED, tiny_artifacts)
    backend.set_masks(masks)
    session, built = backend.session, backend.specialize_seconds
    others = {name: 1 - mask if 0 < mask.sum() < len(mask) else mask for name, mask in masks.items()}  # same states
    backend.set_masks(others)
    assert backend.session is session and backend.specialize_seconds == built
    backend.set_masks({name: np.ones_like(mask) for name, mask in masks.items()})
    assert backend.session is not session and backend.specialize_seconds > built


def test_train_with_the_specialized_backend(tiny_artifacts, tmp_path):
    from onnx_neq.training.run_dir import RunDir
    from onnx_neq.training.train import TrainConfig, train

    config = TrainConfig(
        artifacts=str(tiny_artifacts),
        data="digits",
        classes=[0, 1, 2, 3, 4],
        out=str(tmp_path / "run"),
        epochs=3,
        warmup_epochs=1,
        backend=SPECIALIZED,
        bn_update="selected",
        budget_ratio=0.3,
    )
    result = train(config)
    rows = RunDir(result.run_dir).metrics()
    manifest = read_manifest(tiny_artifacts)
    cost = {layer.name: layer.neuron_cost + 2 for layer in manifest.layers}  # conv + its BN scale and bias
    for row in rows:
        masks = RunDir(result.run_dir).load_masks(int(row["epoch"]))
        assert sum(int(m.sum()) * cost[name] for name, m in masks.items()) == int(row["updated_params"]) <= int(row["budget"])
        assert float(row["step_ms"]) > 0 and int(row["update_bytes"]) > 0 and int(row["backward_macs"]) > 0
    assert (tmp_path / "run" / "model.onnx").exists()
