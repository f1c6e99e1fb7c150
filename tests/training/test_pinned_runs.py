"""Behaviour pinned across refactors: short runs whose metrics.csv were recorded before the package was
reorganised (commit 1b663ce) must come out the same in every column but the timings.

The recordings are tests/data/pinned_runs/<name>.csv. They hold the reference environment's figures
(onnxruntime-training 1.19.2's kernels); stock onnxruntime rounds differently, so the test needs it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from support import cli

pytestmark = [pytest.mark.e2e, pytest.mark.reference, pytest.mark.usefixtures("own_cache")]  # about 20 s a run

PINNED = Path(__file__).resolve().parent.parent / "fixtures" / "pinned_runs"
COMMON = ("--epochs", "3", "--train-limit", "400", "--seed", "3", "--threads", "1")
RUNS = {
    "v_port": ("--backend", "portable", "--selector", "velocity"),
    "r_spec": ("--backend", "specialized", "--selector", "random"),
    "fi_spec": ("--backend", "specialized", "--selector", "fisher"),
    "su_ort": ("--backend", "ort-training", "--selector", "su"),
}
TIMINGS = {"epoch_seconds", "selection_seconds", "step_ms", "specialize_seconds", "probe_seconds"}
ADDED_SINCE = {"flops_saved"}  # columns added after the recording (appended last); the recorded ones stay bit for bit


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


@pytest.mark.parametrize("name", RUNS)
def test_short_run_reproduces_its_recording(name, tmp_path):
    result = cli("train", *COMMON, *RUNS[name], "--out", str(tmp_path / name))
    assert result.returncode == 0, result.stderr[-3000:]
    got, recorded = _rows(tmp_path / name / "metrics.csv"), _rows(PINNED / f"{name}.csv")
    columns = list(recorded[0])
    assert list(got[0])[: len(columns)] == columns, "metrics.csv columns changed (new ones may only be appended)"
    assert set(got[0]) - set(columns) <= ADDED_SINCE, "a new metrics.csv column: append it and name it in ADDED_SINCE"
    for epoch, (row, expected) in enumerate(zip(got, recorded, strict=True)):
        row = {k: row[k] for k in columns}  # the recorded columns, bit for bit
        assert row == expected, f"epoch {epoch}: " + ", ".join(f"{k} {expected[k]} -> {row[k]}" for k in row if row[k] != expected[k])
