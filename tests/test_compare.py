"""compare and report, smoke size: tiny model, 1 epoch, 2 selectors (the real benchmark is not a test)."""

from __future__ import annotations

import csv
import json

from onnx_neq.compare import CompareConfig, compare
from onnx_neq.report import write_report


def test_compare_smoke_writes_table_and_plots(tiny_artifacts, tmp_path):
    config = CompareConfig(
        data=["digits@0-4"],
        out=str(tmp_path / "cmp"),
        methods=["velocity", "random"],
        budget_ratios=[0.3],
        seeds=[0, 1],
        train_options={"epochs": 1, "warmup_epochs": 0},
    )
    files = compare(config, lambda data: str(tiny_artifacts))
    rows = list(csv.DictReader(open(files["csv"])))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("random", "0"), ("random", "1"), ("velocity", "0"), ("velocity", "1")]
    table = files["markdown"].read_text()
    assert "| 30.0% | velocity |" in table and "| 30.0% | random |" in table and "digits@0-4" in table
    for key in ("accuracy", "accuracy vs step", "heatmap digits_0-4-30.0pct"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the CSV's step_ms is the run's metrics.csv step_ms (one epoch: that epoch's)
    for r in rows:
        metrics = list(csv.DictReader(open(f"{r['run']}/metrics.csv")))
        assert float(r["step_ms"]) == round(float(metrics[0]["step_ms"]), 2)
    # the mean +- std in the table is the mean of the per-run values in the CSV
    for method in ("velocity", "random"):
        values = [100 * float(r["test_top1_at_best_val"]) for r in rows if r["method"] == method]
        assert f"{sum(values) / 2:.2f}" in table

    # a second compare finds every run done and only rewrites the report
    again = compare(config, lambda data: str(tiny_artifacts))
    assert again["csv"].read_text() == files["csv"].read_text()

    # report redraws the same table from the run directories
    runs = [tmp_path / "cmp" / "runs" / "digits_0-4" / f"{m}-30.0pct-seed{s}" for m in ("velocity", "random") for s in (0, 1)]
    redrawn = write_report(runs, tmp_path / "report")
    assert redrawn["markdown"].read_text() == files["markdown"].read_text()


def test_compare_command_line(tiny_artifacts, tmp_path):
    """The `compare` command itself (its progress lines and train's events share one callback)."""
    from click.testing import CliRunner

    from onnx_neq.cli import main

    out = tmp_path / "cmp"
    args = ["compare", str(tiny_artifacts), "--data", "digits@0-4", "--methods", "velocity,random", "--budget-ratios", "0.3"]
    result = CliRunner().invoke(main, [*args, "--seeds", "0", "--epochs", "1", "--warmup-epochs", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "[1/2]" in result.output and "[2/2]" in result.output and "| 30.0% | velocity |" in result.output
    assert (out / "report" / "accuracy-vs-step.png").exists()


def test_a_cost_model_variant_is_its_own_method_and_budget_unit(tiny_artifacts, tmp_path):
    """`random[cost=compute]` trains on the specialised backend within 30% of the backward MACs, and the
    report keeps it apart from the parameter-budgeted run (results.csv: method label and cost column)."""
    config = CompareConfig(
        data=["digits@0-4"],
        out=str(tmp_path / "cmp"),
        methods=["random", "random[cost=compute]"],
        budget_ratios=[0.3],
        seeds=[0],
        train_options={"epochs": 1, "warmup_epochs": 0},
    )
    files = compare(config, lambda data: str(tiny_artifacts))
    rows = {r["method"]: r for r in csv.DictReader(open(files["csv"]))}
    assert sorted(rows) == ["random", "random[cost=compute]"]
    assert (rows["random"]["cost"], rows["random"]["backend"]) == ("params", "ort-training")
    assert (rows["random[cost=compute]"]["cost"], rows["random[cost=compute]"]["backend"]) == ("compute", "specialized")
    metrics = list(csv.DictReader(open(f"{rows['random[cost=compute]']['run']}/metrics.csv")))
    assert all(int(m["cost_macs"]) <= int(m["budget"]) for m in metrics)
    total = json.loads(open(f"{rows['random[cost=compute]']['run']}/settings.json").read())["budget"]["total"]
    spent = float(rows["random[cost=compute]"]["mean_updated_ratio"])  # in MACs, the run's unit, not parameters
    assert abs(spent - int(metrics[0]["cost_macs"]) / total) < 1e-4 and 0 < spent <= 0.3
    assert files["accuracy vs step"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_that_cannot_start_is_reported_and_the_others_still_run(tiny_artifacts, tmp_path):
    """A compute budget of a millionth buys no neuron: that run fails in one line, the 30% run still
    trains and is the report; the command exits 2 (a setting that does not apply) after printing it."""
    from click.testing import CliRunner

    from onnx_neq.cli import main

    out = tmp_path / "cmp"
    args = ["compare", str(tiny_artifacts), "--data", "digits@0-4", "--methods", "random[cost=compute]", "--budget-ratios", "0.000001,0.3"]
    result = CliRunner().invoke(main, [*args, "--seeds", "0", "--epochs", "1", "--warmup-epochs", "0", "--out", str(out)])
    assert result.exit_code == 2
    failed = [line for line in result.output.splitlines() if "failed:" in line]
    assert len(failed) == 1 and "0.0pct" in failed[0] and "below the cheapest neuron" in failed[0]
    assert "| 30.0% | random[cost=compute] |" in result.output and "1 run(s) failed" in result.output
    rows = list(csv.DictReader(open(out / "report" / "results.csv")))
    assert [r["budget"] for r in rows] == ["30.0%"]


def test_report_keeps_backends_apart_and_refuses_a_run_given_twice(tiny_artifacts, tmp_path):
    import pytest

    from onnx_neq.errors import NeqError

    paths = []
    for backend in ("ort-training", "portable"):
        config = CompareConfig(
            data=["digits@0-4"], out=str(tmp_path / backend), methods=["random"], budget_ratios=[0.3], seeds=[0],
            train_options={"epochs": 1, "warmup_epochs": 0, "backend": backend},
        )  # fmt: skip
        compare(config, lambda data: str(tiny_artifacts))
        paths.append(tmp_path / backend / "runs" / "digits_0-4" / "random-30.0pct-seed0")
    files = write_report(paths, tmp_path / "both")
    rows = {r["method"]: r["backend"] for r in csv.DictReader(open(files["csv"]))}
    assert rows == {"random[backend=ort-training]": "ort-training", "random[backend=portable]": "portable"}
    with pytest.raises(NeqError, match="report each run once"):
        write_report([paths[0], paths[0]], tmp_path / "twice")
