"""`--selector scotti` as a run: its backend, hyper.csv, flops_saved, frozen channels, resume after SIGKILL."""

from __future__ import annotations

import csv
import subprocess

import numpy as np
import pytest
from support import cli, cli_command, kill_after_lines

from onnx_neq.backends.base import SPECIALIZED, open_backend
from onnx_neq.training import metrics
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("own_cache")
DIGITS_0_4 = ["--data", "digits", "--classes", "0-4"]  # real data shaped like the tiny model: 8x8, 5 classes


def _hyper(run: RunDir) -> list[dict[str, str]]:
    with open(run.path / "hyper.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def scotti_run(tiny_artifacts, tmp_path_factory) -> RunDir:
    out = tmp_path_factory.mktemp("scotti") / "run"
    config = TrainConfig(
        artifacts=str(tiny_artifacts), data="digits", classes=[0, 1, 2, 3, 4], out=str(out), epochs=4, batch_size=16, lr=0.01,
        threads=1, train_limit=300, selector="scotti", eps=0.02, eps_hyper_lr=1e-3,
    )  # fmt: skip
    train(config)
    return RunDir(out)


def test_runs_on_a_host_backend_with_the_authors_defaults(scotti_run):
    config = scotti_run.settings()["config"]
    assert config["backend"] == SPECIALIZED  # no --backend: one that hands the update rule its gradients
    assert (config["momentum"], config["hyper_lr"], config["weight_decay"]) == (0.9, 1e-4, 1e-3)


def test_hyper_csv_has_a_row_per_iteration(scotti_run):
    rows, by_epoch = _hyper(scotti_run), scotti_run.metrics_by_epoch()
    assert [int(r["iteration"]) for r in rows] == list(range(len(rows)))
    assert {int(r["epoch"]) for r in rows} == set(by_epoch) == {0, 1, 2, 3}
    warmup = [r for r in rows if r["epoch"] == "0"]
    assert all(float(r["frozen_share"]) == 0 and float(r["eps"]) == 0.02 for r in warmup)  # no velocity yet: eps does not learn
    assert len({r["lr"] for r in rows}) > len(rows) // 2  # the learning rate learns every step
    assert any(float(r["frozen_share"]) > 0 for r in rows)
    for epoch, row in by_epoch.items():  # metrics' lr: the learned rate after the epoch's last step
        last = [r for r in rows if int(r["epoch"]) == epoch][-1]
        assert float(row[metrics.LR]) == pytest.approx(float(last["lr"]), rel=1e-5)


def test_flops_saved_follows_the_frozen_share(scotti_run):
    rows = _hyper(scotti_run)
    for epoch, row in scotti_run.metrics_by_epoch().items():
        frozen = [float(r["frozen_share"]) for r in rows if int(r["epoch"]) == epoch]
        saved = float(row[metrics.FLOPS_SAVED])
        assert (saved > 0) == (max(frozen) > 0), epoch
        assert 0 <= saved < 1


def test_channels_frozen_for_a_whole_epoch_are_bit_identical(scotti_run, tiny_artifacts):
    """Momentum SGD with weight decay, masked: a channel whose |velocity| stayed under every step's eps never moved."""
    from onnx_neq.manifest import read_manifest

    manifest = read_manifest(tiny_artifacts)
    rows, state = _hyper(scotti_run), scotti_run.load_state()
    checked = 0
    for epoch in range(1, 4):
        before, after = scotti_run.checkpoint_path(epoch - 1), scotti_run.checkpoint_path(epoch)
        if not (before.exists() and after.exists()):
            continue
        with np.load(scotti_run.velocity / f"epoch_{epoch - 1:03d}.npz") as z:
            velocity = np.abs(z["velocity"])
        eps = min(float(r["eps"]) for r in rows if int(r["epoch"]) == epoch)
        a, b = (open_backend(SPECIALIZED, tiny_artifacts, p).parameters() for p in (before, after))
        start = 0
        for layer in manifest.layers:
            frozen = velocity[start : start + layer.out_channels] < eps
            start += layer.out_channels
            for p in filter(None, (layer.weight, layer.bias)):
                assert np.array_equal(a[p][frozen], b[p][frozen]), (epoch, p)
                checked += int(frozen.sum())
    assert checked > 0 and state.epoch == 3


def test_refused_on_the_ort_training_backend(tiny_artifacts, tmp_path):
    result = cli(
        "train", str(tiny_artifacts), *DIGITS_0_4, "--selector", "scotti", "--backend", "ort-training", "--out", str(tmp_path / "r")
    )
    assert result.returncode == 2
    assert "--backend specialized or portable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_killed_scotti_run_resumes_to_the_same_result(tiny_artifacts, tmp_path):
    """The hyper-parameters, their momenta and the momentum buffers are run state: SIGKILL mid-run, resume, and
    metrics, weights, model.onnx and hyper.csv equal those of an uninterrupted run."""
    args = ["train", str(tiny_artifacts), *DIGITS_0_4, "--selector", "scotti", "--epochs", "12", "--batch-size", "4"]
    args += ["--lr", "0.005", "--eps", "0.02", "--train-limit", "300", "--threads", "1"]
    subprocess.run(cli_command(*args, "--out", str(tmp_path / "straight")), check=True, capture_output=True, timeout=600)
    kill_after_lines([*args, "--out", str(tmp_path / "killed")], tmp_path / "killed" / "metrics.csv", 4)
    killed, straight = RunDir(tmp_path / "killed"), RunDir(tmp_path / "straight")
    assert 3 <= len(killed.metrics()) < 12
    resumed = subprocess.run(cli_command("train", "--out", str(killed.path), "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert [_untimed(r) for r in straight.metrics()] == [_untimed(r) for r in killed.metrics()]
    assert _hyper(straight) == _hyper(killed)
    a, b = (open_backend(SPECIALIZED, tiny_artifacts, r.path / r.load_state().checkpoint).parameters() for r in (straight, killed))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (straight.path / "model.onnx").read_bytes() == (killed.path / "model.onnx").read_bytes()


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in metrics.TIMING}


def test_report_draws_hyper_csv(scotti_run, tmp_path):
    result = cli("report", str(scotti_run.path), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    plots = list((tmp_path / "report").glob("hyper-*.png"))
    assert len(plots) == 1 and plots[0].stat().st_size > 10_000
