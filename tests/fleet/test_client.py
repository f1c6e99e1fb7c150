"""A client's round: the update holds exactly the channels it trained (and the classifier), and its bytes are the
arrays' sizes. The reference is the same round sent dense: the rows whose values moved from the global ones."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_neq.backends.base import PORTABLE, SPECIALIZED, open_backend
from onnx_neq.fleet.client import local_round, traveling
from onnx_neq.fleet.config import FleetConfig
from onnx_neq.fleet.updates import CHANNELS, DENSE
from onnx_neq.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("own_cache")


def _fleet(artifacts, tmp_path, **options) -> FleetConfig:
    values = dict(
        artifacts=str(artifacts), data="digits", classes=[0, 1, 2, 3, 4], out=str(tmp_path / "fleet"), clients=3, split="dirichlet:0.5",
        batch_size=16, lr=0.05, threads=1, train_limit=200, budget_ratio=0.3, selector="random",
    )  # fmt: skip
    return FleetConfig(**{**values, **options})


def _global(artifacts) -> dict[str, np.ndarray]:
    manifest = read_manifest(artifacts)
    session = open_backend(PORTABLE, artifacts)
    return {name: session.parameter(name) for name in traveling(manifest, "always").names}


@pytest.mark.parametrize("backend", [PORTABLE, SPECIALIZED])
def test_update_holds_exactly_the_trained_channels(tiny_artifacts, tmp_path, backend):
    fleet = _fleet(tiny_artifacts, tmp_path, backend=backend, epochs=2)
    start = _global(tiny_artifacts)
    start = {k: v + np.float32(0.01) * np.arange(v.size, dtype=np.float32).reshape(v.shape) / v.size for k, v in start.items()}
    local = fleet.local(client=1, round_=1)
    sparse = local_round(local, start, CHANNELS, workdir=str(tmp_path))
    dense = local_round(local, start, DENSE, workdir=str(tmp_path))  # the same round (same seed): every parameter whole
    manifest = read_manifest(tiny_artifacts)
    final = dense.update.whole
    assert set(final) == set(start)
    for layer in manifest.layers:
        moved = np.flatnonzero(np.any((final[layer.weight] != start[layer.weight]).reshape(layer.out_channels, -1), axis=1))
        sent = sparse.update.rows.get(layer.weight, (np.zeros(0, np.int32), None))[0]
        assert sent.tolist() == moved.tolist(), layer.name  # exactly the channels that trained, over both epochs
        for name in [layer.weight, *([layer.bias] if layer.bias else [])]:
            if sent.size:  # a bias travels with its channel (before train-mode BatchNorm its gradient is 0: it need not move)
                assert sparse.update.rows[name][0].tolist() == sent.tolist()
                np.testing.assert_array_equal(sparse.update.rows[name][1], final[name][sent])
            else:
                assert name not in sparse.update.rows
                np.testing.assert_array_equal(final[name], start[name])
    assert 0 < sum(i.size for i, _ in sparse.update.rows.values())
    assert sum(i.size for i, _ in sparse.update.rows.values()) < sum(start[layer.weight].shape[0] for layer in manifest.layers) * 2
    classifier = [n for n in manifest.always_trained if n not in {layer.bn[0] for layer in manifest.layers}]
    for name in manifest.always_trained:  # the classifier and (--bn-update always) BatchNorm scale and bias: whole
        np.testing.assert_array_equal(sparse.update.whole[name], final[name])
    assert any("fc" in name for name in classifier)
    stats = [n for s in manifest.bn_stats for n in (s["running_mean"], s["running_var"])]
    assert stats and all(name in sparse.update.whole for name in stats)  # train-mode BatchNorm: statistics whole


def test_byte_count_is_the_array_sizes(tiny_artifacts, tmp_path):
    fleet = _fleet(tiny_artifacts, tmp_path, backend=PORTABLE)
    result = local_round(fleet.local(client=0, round_=1), _global(tiny_artifacts), CHANNELS, workdir=str(tmp_path))
    manifest = read_manifest(tiny_artifacts)
    shapes = {n: a.shape for n, a in _global(tiny_artifacts).items()}
    expected = 0
    for name, (indices, _) in result.update.rows.items():  # int32 index + float32 row per sent channel
        expected += indices.size * 4 + indices.size * int(np.prod(shapes[name][1:], dtype=np.int64)) * 4
    expected += sum(int(np.prod(shapes[n], dtype=np.int64)) * 4 for n in result.update.whole)
    assert result.update.nbytes() == expected
    assert set(result.update.whole) == set(manifest.always_trained) | {
        n for s in manifest.bn_stats for n in (s["running_mean"], s["running_var"])
    }
    assert list(tmp_path.glob("onnx-neq-round-*")) == []  # the round's run folder is removed


def test_client_shards_partition_the_training_split(tiny_artifacts, tmp_path):
    from onnx_neq.training.setup import load_run_dataset

    fleet = _fleet(tiny_artifacts, tmp_path, train_limit=None)
    manifest = read_manifest(tiny_artifacts)
    sizes = [len(load_run_dataset(fleet.local(client=c, round_=1), manifest).train) for c in range(3)]
    whole = load_run_dataset(fleet.local(client=0, round_=1, node={"num-partitions": 1}), manifest).train
    assert sum(sizes) == len(whole) and len(set(sizes)) > 1  # a Dirichlet split: unequal parts of the whole


def test_a_client_keeps_its_selector_statistics_between_rounds(tiny_artifacts, tmp_path):
    """NEq trains every channel in a run's first epoch; a client that carries its velocity from round 1 trains,
    in round 2's first epoch, exactly the channels whose carried |velocity| exceeds eps (the rule, by hand)."""
    start = _global(tiny_artifacts)
    first = local_round(_fleet(tiny_artifacts, tmp_path, selector="neq", budget_ratio=None).local(0, 1), start, CHANNELS)
    velocity = first.selector_state["velocity"]
    assert int(first.selector_state["steps"]) == 1
    eps = float(np.median(np.abs(velocity)))
    fleet = _fleet(tiny_artifacts, tmp_path, selector="neq", budget_ratio=None, eps=eps)
    fresh = local_round(fleet.local(0, 2), start, CHANNELS)
    carried = local_round(fleet.local(0, 2), start, CHANNELS, selector_state=first.selector_state)
    manifest = read_manifest(tiny_artifacts)
    offset = 0
    for layer in manifest.layers:
        expected = np.flatnonzero(np.abs(velocity[offset : offset + layer.out_channels]) > eps)
        offset += layer.out_channels
        assert fresh.update.rows[layer.weight][0].tolist() == list(range(layer.out_channels))  # first epoch: all
        sent = carried.update.rows.get(layer.weight, (np.zeros(0, np.int32), None))[0]
        assert sent.tolist() == expected.tolist(), layer.name
    assert 0 < sum(len(i) for i, _ in carried.update.rows.values()) < sum(len(i) for i, _ in fresh.update.rows.values())
    assert int(carried.selector_state["steps"]) == 2
