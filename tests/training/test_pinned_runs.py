"""Behaviour pinned across refactors: short runs whose metrics.csv were recorded by the code before the package
was reorganised (commit 1b663ce) must come out the same in every column but the timings.

The recordings are tests/fixtures/pinned_runs/<name>.csv, with the machine they were recorded on in
recorded_on.json. They hold the reference environment's figures (onnxruntime-training 1.19.2's kernels; stock
onnxruntime rounds differently, so the test needs it). onnxruntime picks its kernels by the CPU's vector
instructions, which round differently: on a CPU with the recording's instruction sets every column must agree bit
for bit; on another, the columns the settings fix (epoch, learning rate, budget) and the first epoch's selection
must still agree exactly, and the rest within what float rounding moves on a short run (velocity's later
selections may pick a few other channels): losses 1% relative, top-1 5 points, selection counts and costs 5%.
"""

from __future__ import annotations

import csv
import json
import platform
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
FIXED = {"epoch", "lr", "budget"}  # set by the settings alone
RELATIVE = {"train_loss": 0.01}  # other columns: top-1 within 0.05, counts and costs within 5%
SIMD = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
        "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2"}  # fmt: skip


def cpu() -> dict:
    """The machine and the vector instruction sets onnxruntime chooses kernels by (Linux; none elsewhere)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features")))
        found = sorted(SIMD & set(flags.split(":", 1)[1].split()))
    except (OSError, StopIteration):
        found = []
    return {"machine": platform.machine(), "simd": found}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


def _close(column: str, got: str, want: str, epoch: int) -> bool:
    if column in FIXED or (epoch == 0 and column not in RELATIVE and "top1" not in column):
        return got == want
    a, b = float(got), float(want)
    if "top1" in column:
        return abs(a - b) <= 0.05
    return abs(a - b) <= RELATIVE.get(column, 0.05) * max(abs(b), 1e-12)


@pytest.mark.parametrize("name", RUNS)
def test_short_run_reproduces_its_recording(name, tmp_path):
    result = cli("train", *COMMON, *RUNS[name], "--out", str(tmp_path / name))
    assert result.returncode == 0, result.stderr[-3000:]
    got, recorded = _rows(tmp_path / name / "metrics.csv"), _rows(PINNED / f"{name}.csv")
    columns = list(recorded[0])
    assert list(got[0])[: len(columns)] == columns, "metrics.csv columns changed (new ones may only be appended)"
    assert set(got[0]) - set(columns) <= ADDED_SINCE, "a new metrics.csv column: append it and name it in ADDED_SINCE"
    exact = cpu() == json.loads((PINNED / "recorded_on.json").read_text())
    for epoch, (row, expected) in enumerate(zip(got, recorded, strict=True)):
        row = {k: row[k] for k in columns}  # the recorded columns
        off = [k for k in columns if (row[k] != expected[k] if exact else not _close(k, row[k], expected[k], epoch))]
        how = "bit for bit (the recording's CPU)" if exact else f"within rounding (another CPU: {cpu()})"
        assert not off, f"epoch {epoch}, {how}: " + ", ".join(f"{k} {expected[k]} -> {row[k]}" for k in off)
