"""`onnx-neq prune`: each round's sparsity as the schedule says, pruned weights exactly 0 after fine-tuning on
every backend it accepts, and a SIGKILLed prune that the same command finishes as an uninterrupted one.

The tiny model's prunable convs (each followed by BatchNorm and ReLU): stem 8x3x3x3 = 216 weights,
depthwise 8x1x3x3 = 72, grouped 12x2x1x1 = 24: 312 in all. Round 1 prunes floor(312 / 2) = 156 (50%),
round 2 floor(156 / 2) = 78 more (234 of 312 = 75%).
"""

from __future__ import annotations

import csv
import subprocess

import numpy as np
import pytest
from support import cli, cli_command, kill_after_lines

from onnx_neq.backends.base import PORTABLE, SPECIALIZED, open_backend
from onnx_neq.training.metrics import TIMING
from onnx_neq.training.run_dir import RunDir

pytestmark = pytest.mark.usefixtures("own_cache")
ARGS = ["--data", "digits", "--classes", "0-4", "--sparsity", "0.75", "--epochs", "2", "--warmup-epochs", "0", "--train-limit", "200"]
ARGS += ["--lr", "0.02", "--threads", "1"]
PRUNABLE = {"stem.weight": 216, "dw.weight": 72, "grouped.weight": 24}


def _rounds(out) -> list[dict]:
    with open(out / "rounds.csv", newline="") as f:
        return list(csv.DictReader(f))


def _final(out, r: int, backend: str) -> dict[str, np.ndarray]:
    run = RunDir(out / f"round_{r:02d}" / "run")
    artifacts = out / "artifacts"
    return open_backend(backend, artifacts, run.path / run.load_state().checkpoint).parameters()


@pytest.fixture(scope="module", params=[SPECIALIZED, PORTABLE])
def pruned(request, tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / request.param
    result = cli("prune", str(tiny_onnx[0]), *ARGS, "--backend", request.param, "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out, request.param, result.stdout


def test_each_round_reaches_the_schedules_sparsity(pruned):
    out, _, _ = pruned
    rows = _rounds(out)
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert [float(r["sparsity"]) for r in rows] == [0.0, 0.5, 0.75]  # 0, 156 and 234 of 312
    for r in (1, 2):
        with np.load(out / f"round_{r:02d}" / "masks.npz") as z:
            assert {k: z[k].size for k in z.files} == PRUNABLE
            assert sum(int((~z[k]).sum()) for k in z.files) == {1: 156, 2: 234}[r]


def test_pruned_weights_are_exactly_zero_after_fine_tuning(pruned):
    out, backend, _ = pruned
    for r in (1, 2):
        with np.load(out / f"round_{r:02d}" / "masks.npz") as z:
            keep = {k: z[k] for k in z.files}
        start = open_backend(backend, out / "artifacts", out / f"round_{r:02d}" / "start.ckpt").parameters()
        final = _final(out, r, backend)
        for name, mask in keep.items():
            assert np.all(final[name][~mask] == 0), name  # held at 0 by the update, every epoch
            assert not np.array_equal(final[name][mask], start[name][mask]), name  # the kept ones trained
        if r == 2:  # round 1's pruned weights stay pruned
            with np.load(out / "round_01" / "masks.npz") as z:
                assert all(np.all(keep[k] <= z[k]) for k in z.files)


def test_summary_compares_dense_and_pruned(pruned):
    out, _, stdout = pruned
    assert "dense (round 0)" in stdout and "pruned" in stdout and "latency ms" in stdout
    assert (out / "model.onnx").exists()


def test_refused_on_the_ort_training_backend(tiny_onnx, tmp_path):
    result = cli("prune", str(tiny_onnx[0]), *ARGS, "--backend", "ort-training", "-o", str(tmp_path / "p"))
    assert result.returncode == 2
    assert "--backend specialized or portable" in result.stderr


def test_killed_prune_finishes_as_an_uninterrupted_one(tiny_onnx, tmp_path):
    args = ["prune", str(tiny_onnx[0]), *ARGS[:-4], "--epochs", "4", "--lr", "0.02", "--threads", "1", "--backend", SPECIALIZED]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cli_command(*args, "-o", str(straight)), check=True, capture_output=True, timeout=600)
    kill_after_lines([*args, "-o", str(killed)], killed / "round_01" / "run" / "metrics.csv", 2)
    assert not (killed / "round_02").exists() or not (killed / "model.onnx").exists()
    again = cli(*args, "-o", str(killed))
    assert again.returncode == 0, again.stderr
    assert _rounds(straight) == _rounds(killed)
    for r in (0, 1, 2):
        a, b = (RunDir(p / f"round_{r:02d}" / "run").metrics() for p in (straight, killed))
        assert [{k: v for k, v in row.items() if k not in TIMING} for row in a] == [
            {k: v for k, v in row.items() if k not in TIMING} for row in b
        ]
    assert (straight / "model.onnx").read_bytes() == (killed / "model.onnx").read_bytes()


def test_another_prune_in_the_same_folder_is_refused(pruned, tiny_onnx):
    out, backend, _ = pruned
    result = cli("prune", str(tiny_onnx[0]), *ARGS, "--method", "magnitude", "--backend", backend, "-o", str(out))
    assert result.returncode == 2 and "other settings" in result.stderr
