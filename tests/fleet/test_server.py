"""The server's folder and rounds: a malformed update is rejected with a log line and leaves the global model alone,
a failed client is recorded, the state survives a restart, and the global model is what `onnx-neq eval` scores."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from onnx_neq.backends.base import PORTABLE, open_backend
from onnx_neq.data.datasets import load_dataset
from onnx_neq.errors import NeqError
from onnx_neq.fleet.config import FleetConfig
from onnx_neq.fleet.server import FleetServer, Reply
from onnx_neq.fleet.updates import ChannelUpdate
from onnx_neq.manifest import read_manifest
from onnx_neq.training.evaluate import evaluate
from onnx_neq.training.setup import prep

pytestmark = pytest.mark.usefixtures("own_cache")


def _config(artifacts, out, **options) -> FleetConfig:
    values = dict(artifacts=str(artifacts), data="digits", classes=[0, 1, 2, 3, 4], out=str(out), clients=3, rounds=3)
    return FleetConfig(**{**values, **options})


def _layer(artifacts):
    return read_manifest(artifacts).layers[0]


def test_a_round_merges_the_good_updates_and_rejects_the_malformed(tiny_artifacts, tmp_path, caplog):
    server = FleetServer(_config(tiny_artifacts, tmp_path / "fleet"))
    first, params = server.start()
    assert first == 1
    layer = _layer(tiny_artifacts)
    w = params[layer.weight]
    good = ChannelUpdate(30, rows={layer.weight: (np.array([1], np.int32), np.full((1, *w.shape[1:]), 2.0, np.float32))})
    other = ChannelUpdate(10, rows={layer.weight: (np.array([1, 2], np.int32), np.full((2, *w.shape[1:]), 6.0, np.float32))})
    nan = ChannelUpdate(50, rows={layer.weight: (np.array([0], np.int32), np.full((1, *w.shape[1:]), np.nan, np.float32))})
    outside = ChannelUpdate(50, rows={layer.weight: (np.array([w.shape[0]], np.int32), np.zeros((1, *w.shape[1:]), np.float32))})
    shape = ChannelUpdate(50, whole={layer.weight: np.zeros((w.shape[0] + 1, *w.shape[1:]), np.float32)})
    replies = [
        Reply("a", good),
        Reply("b", other),
        Reply("c", nan),
        Reply("d", outside),
        Reply("e", shape),
        Reply("f", ChannelUpdate(1), error="killed"),
    ]
    with caplog.at_level(logging.WARNING, logger="onnx_neq.fleet"):
        merged = server.merge(1, params, replies)
    expected = w.copy()
    expected[1] = (30 * 2.0 + 10 * 6.0) / 40  # by hand: examples-weighted over the clients that sent channel 1
    expected[2] = 6.0  # only b sent channel 2
    np.testing.assert_array_equal(merged[layer.weight], expected)  # channel 0 and the rest: bit-identical
    for name in params:
        if name != layer.weight:
            np.testing.assert_array_equal(merged[name], params[name])
    rejected = [r.message for r in caplog.records if "rejected" in r.message]
    assert len(rejected) == 3 and any("not finite" in m for m in rejected) and any("out of range" in m for m in rejected)
    assert any("client f sent no update: killed" in r.message for r in caplog.records)
    rows = {r["client"]: r for r in server.rows() if r["round"] == "1"}
    assert rows["a"]["note"] == "" and rows["c"]["note"].startswith("rejected: ") and rows["f"]["note"] == "failed: killed"
    assert int(rows["a"]["bytes_sent"]) == 4 + w[0].size * 4


def test_the_global_model_is_what_eval_scores(tiny_artifacts, tmp_path):
    server = FleetServer(_config(tiny_artifacts, tmp_path / "fleet"))
    _, params = server.start()
    layer = _layer(tiny_artifacts)
    whole = {layer.weight: np.zeros_like(params[layer.weight])}
    merged = server.merge(1, params, [Reply("a", ChannelUpdate(5, whole=whole))])
    top1 = evaluate(server.out / "model.onnx", "digits", [0, 1, 2, 3, 4]).top1
    assert float(server.rows()[-1]["global_top1"]) == pytest.approx(top1, abs=1e-4)
    session = open_backend(PORTABLE, server.config.artifacts)
    session.set_parameters(merged)  # the reference: the backend's own evaluation of the merged parameters
    data = load_dataset("digits@0-4", (8, 8))
    logits = session.eval_logits(prep(session.manifest, data.test.images))
    assert top1 == pytest.approx(float(np.mean(logits.argmax(1) == data.test.labels)), abs=1e-6)


def test_the_server_resumes_after_its_last_completed_round(tiny_artifacts, tmp_path):
    out = tmp_path / "fleet"
    server = FleetServer(_config(tiny_artifacts, out))
    _, params = server.start()
    layer = _layer(tiny_artifacts)
    merged = server.merge(1, params, [Reply("a", ChannelUpdate(5, whole={layer.weight: np.ones_like(params[layer.weight])}))])
    (out / "rounds.csv").write_text((out / "rounds.csv").read_text() + "2,a,5,,0,0,0,0,0,\n")  # a round 2 cut short
    again = FleetServer(_config(tiny_artifacts, out, rounds=5))  # a restart (more rounds may be asked for)
    first, resumed = again.start()
    assert first == 2
    assert all(np.array_equal(resumed[k], merged[k]) for k in merged)
    again.merge(2, resumed, [])
    assert [r["round"] for r in again.rows() if r["client"] != "-"] == ["1"]  # the cut-short row is gone
    with pytest.raises(NeqError, match="other settings.*lr"):
        FleetServer(_config(tiny_artifacts, out, lr=0.5)).start()


def test_an_out_that_holds_something_else_is_refused(tiny_artifacts, tmp_path):
    (tmp_path / "mine.txt").write_text("not a fleet")
    with pytest.raises(NeqError, match="holds no fleet"):
        FleetServer(_config(tiny_artifacts, tmp_path)).start()
    assert (tmp_path / "mine.txt").read_text() == "not a fleet"
