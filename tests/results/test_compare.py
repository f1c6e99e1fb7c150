"""compare and report, smoke size: tiny model, 1 epoch, 2 selectors (the real benchmark is not a test)."""

from __future__ import annotations

import csv
import json

import pytest

from onnx_neq.results.compare import CompareConfig, compare
from onnx_neq.results.report import write_report


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


@pytest.mark.reference
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


@pytest.mark.reference
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


# -- one compare per --out, and reports that are never half-written ------------------------------------


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _finished_compare(tiny_artifacts, out, methods) -> dict:
    config = CompareConfig(
        data=["digits@0-4"], out=str(out), methods=methods, budget_ratios=[0.3], seeds=[0],
        train_options={"epochs": 1, "warmup_epochs": 0},
    )  # fmt: skip
    return compare(config, lambda data: str(tiny_artifacts))


@pytest.fixture(scope="module")
def two_runs(tiny_artifacts, tmp_path_factory):
    """A finished compare of velocity and random (one seed, one epoch): its OUT and its two run directories."""
    out = tmp_path_factory.mktemp("cmp") / "out"
    _finished_compare(tiny_artifacts, out, ["velocity", "random"])
    runs = out / "runs" / "digits_0-4"
    return out, runs / "velocity-30.0pct-seed0", runs / "random-30.0pct-seed0"


def test_a_second_compare_on_the_same_out_is_refused_while_the_first_runs(tiny_artifacts, tmp_path):
    from click.testing import CliRunner

    from onnx_neq.cli import main
    from onnx_neq.training.run_lock import RunLock

    out = tmp_path / "cmp"
    out.mkdir()
    args = ["compare", str(tiny_artifacts), "--data", "digits@0-4", "--methods", "random", "--budget-ratios", "0.3", "--seeds", "0"]
    with RunLock(out):  # the first compare, as far as the second can tell
        result = CliRunner().invoke(main, [*args, "--epochs", "1", "--warmup-epochs", "0", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use by another onnx-neq process" in lines[0] and str(out) in lines[0]
    assert not (out / "runs").exists() and not (out / "report").exists()


def test_a_report_failing_midway_leaves_the_previous_report_whole(tiny_artifacts, two_runs, tmp_path, monkeypatch):
    import shutil

    from onnx_neq.results import report

    out = tmp_path / "out"
    shutil.copytree(two_runs[0], out)
    _finished_compare(tiny_artifacts, out, ["velocity"])  # every run done: only the report is drawn
    before = _files(out / "report")
    assert "heatmap-digits_0-4-30.0pct.png" in before

    def broken(runs, path):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(report, "plot_accuracy_vs_step", broken)  # after results.csv and results.md are drawn
    with pytest.raises(RuntimeError, match="the plot failed"):
        _finished_compare(tiny_artifacts, out, ["velocity", "random"])
    assert _files(out / "report") == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "report", "runs"]  # no staging folder left behind
    monkeypatch.undo()
    files = _finished_compare(tiny_artifacts, out, ["random"])
    assert len(list(csv.DictReader(open(files["csv"])))) == 1
    assert "heatmap-digits_0-4-30.0pct.png" not in _files(out / "report")  # replaced whole: nothing of the old one mixed in


def test_report_into_a_folder_of_the_users_keeps_their_files(two_runs, tmp_path, monkeypatch):
    from onnx_neq.results import report

    _, velocity, random = two_runs
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own notes")
    (mine / "results.csv").write_text("an old report's table")
    write_report([velocity], mine)
    before = _files(mine)
    assert "heatmap-digits_0-4-30.0pct.png" in before and before["notes.txt"] == b"my own notes"

    monkeypatch.setattr(report, "plot_accuracy", lambda runs, path: (_ for _ in ()).throw(RuntimeError("no plot")))
    with pytest.raises(RuntimeError, match="no plot"):
        write_report([velocity, random], mine)
    assert _files(mine) == before and sorted(p.name for p in mine.iterdir() if p.is_dir()) == []
    monkeypatch.undo()

    files = write_report([random], mine)
    after = _files(mine)
    assert after["notes.txt"] == b"my own notes"
    assert [r["method"] for r in csv.DictReader(open(files["csv"]))] == ["random"]
    assert "heatmap-digits_0-4-30.0pct.png" not in after  # the previous report's own file, removed
    assert not [p for p in mine.iterdir() if p.is_dir()]
