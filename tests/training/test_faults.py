"""Fault injection: each failure a user can meet ends in one line, the documented exit status, and a
run directory that is still usable (README, "Exit status"). Numbers refer to the cases of the
reliability issue: 1 chaining, 2 bad data, 3 divergence, 4 concurrent runs, 5 fragile resume,
6 environment failures, 8 errors inside passes, 9 small things."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support import cli, cli_command

from onnx_neq.backends.ort_training import TrainingSession
from onnx_neq.cli import main
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.train import TrainConfig, train

TIMING = {"epoch_seconds", "selection_seconds", "step_ms", "specialize_seconds"}  # wall-clock columns
DIGITS_0_4 = ["--data", "digits", "--classes", "0-4"]


pytestmark = pytest.mark.usefixtures("own_cache")  # a cache of its own per test


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("onnx-neq:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _config(artifacts, out, **overrides) -> TrainConfig:
    settings = dict(artifacts=str(artifacts), data="digits", classes=[0, 1, 2, 3, 4], out=str(out), epochs=4, warmup_epochs=1, lr=0.05)
    settings.update(overrides)
    return TrainConfig(**settings)


def _rows(run: RunDir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in run.metrics()]


def _same_run(a: Path, b: Path, artifacts) -> None:
    ra, rb = RunDir(a), RunDir(b)
    assert _rows(ra) == _rows(rb)
    pa = TrainingSession(artifacts, a / ra.load_state().checkpoint).parameters()
    pb = TrainingSession(artifacts, b / rb.load_state().checkpoint).parameters()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()


def _stop_in_epoch(epoch: int):
    def progress(event, info):
        if event == "step" and info["epoch"] == epoch and info["step"] == 2:
            raise KeyboardInterrupt

    return progress


@pytest.fixture(scope="module")
def straight(tiny_artifacts, tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run: what every damaged-then-resumed run must end as."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(_config(tiny_artifacts, out))
    return out


def _interrupted(artifacts, out: Path, at_epoch: int = 3) -> RunDir:
    with pytest.raises(KeyboardInterrupt):
        train(_config(artifacts, out), progress=_stop_in_epoch(at_epoch))
    return RunDir(out)


# 1. the documented commands chain ------------------------------------------------------------------


def test_train_without_artifacts_dir_uses_local_artifacts_and_shows_the_budget_first(tiny_artifacts, tmp_path):
    shutil.copytree(tiny_artifacts, tmp_path / "artifacts")
    result = cli("train", *DIGITS_0_4, "--epochs", "1", "--budget", "100", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("model") and str(tmp_path / "artifacts") in lines[0]
    budget = next(i for i, line in enumerate(lines) if line.startswith("budget"))
    first_epoch = next(i for i, line in enumerate(lines) if line.strip().startswith("0 "))
    assert budget < first_epoch and "100 of 328 selectable parameters" in lines[budget]  # 8*(27+1) + 8*(9+1) + 12*2
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["artifacts"]["path"] == str(tmp_path / "artifacts")


def test_a_head_of_another_width_is_replaced_for_the_data(tiny_artifacts, tmp_path):
    """The tiny model has 5 classes; all 10 digits get a fresh 10-class head, said before training."""
    result = cli("train", str(tiny_artifacts), "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "fresh 10-class head" in result.stderr
    from onnx_neq.manifest import read_manifest

    used = json.loads((tmp_path / "run" / "settings.json").read_text())["artifacts"]["path"]
    assert read_manifest(used).num_classes == 10 and str(tmp_path / "cache") in used


def test_budget_above_the_total_is_said_before_the_first_epoch(tiny_artifacts, tmp_path):
    result = cli("train", str(tiny_artifacts), *DIGITS_0_4, "--epochs", "1", "--budget", "10000000", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    warning = next(i for i, line in enumerate(lines) if "every neuron trains" in line)
    assert warning < next(i for i, line in enumerate(lines) if line.strip().startswith("0 "))
    assert "(100.0%;" in result.stderr
    from onnx_neq.results.report import summarize

    assert summarize(tmp_path / "run").budget_label == "100.0%"  # not "3048780.5%"


# 2. bad data ------------------------------------------------------------------------------------------


def _npz(path: Path, **changes) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images[:, :, :] / 16.0).astype(np.float32), digits.target[:]
    keep = y < 5
    arrays = {"x_train": x[keep][:300], "y_train": y[keep][:300], "x_test": x[keep][300:], "y_test": y[keep][300:]}
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


def _labels(**where):
    from sklearn.datasets import load_digits

    y = load_digits().target
    y = y[y < 5][:300].astype(np.float64)
    for index, value in where.items():
        y[int(index[1:])] = value
    return y


@pytest.mark.parametrize(
    "case,needle",
    [
        ("nan_pixel", "NaN or infinite"),
        ("negative_label", "-1 occurs"),
        ("fractional_label", "not integers"),
        ("label_42", "never occur"),
        ("not_npz", "not a readable .npz"),
        ("pixels_out_of_range", "pixel values span"),
    ],
)
def test_bad_data_is_one_line_exit_2_and_no_run(case, needle, tiny_artifacts, tmp_path):
    path = tmp_path / "data.npz"
    if case == "nan_pixel":
        x = _npz(tmp_path / "ok.npz")
        with np.load(x) as z:
            images = z["x_train"].copy()
        images[3, 2, 2] = np.nan
        _npz(path, x_train=images)
    elif case == "negative_label":
        _npz(path, y_train=_labels(i7=-1).astype(np.int64))
    elif case == "fractional_label":
        _npz(path, y_train=_labels(i7=2.5))
    elif case == "label_42":
        _npz(path, y_train=_labels(i7=42).astype(np.int64))
    elif case == "not_npz":
        path.write_text("x_train,y_train\n1,2\n")
    else:
        x = _npz(tmp_path / "ok.npz")
        with np.load(x) as z:
            _npz(path, x_train=z["x_train"] * 300)
    result = cli("train", str(tiny_artifacts), "--data", f"npz:{path}", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert needle in _one_line(result.stderr) and str(path) in result.stderr
    assert not (tmp_path / "run").exists()


def test_valid_float_npz_trains(tiny_artifacts, tmp_path):
    path = _npz(tmp_path / "ok.npz")
    result = cli("train", str(tiny_artifacts), "--data", f"npz:{path}", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr


# 3. divergence ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["nan", "inf", "-1", "0"])
def test_learning_rate_must_be_finite_and_positive(lr, tiny_artifacts, tmp_path):
    result = cli("train", str(tiny_artifacts), *DIGITS_0_4, "--lr", lr, "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "--lr must be a finite number above 0" in _one_line(result.stderr)
    assert not (tmp_path / "run").exists()


def test_exploding_loss_stops_the_run_with_exit_3(tiny_artifacts, tmp_path):
    result = cli(
        "train", str(tiny_artifacts), *DIGITS_0_4, "--lr", "10000", "--warmup-epochs", "0", "--epochs", "3", "--out", str(tmp_path / "run")
    )
    assert result.returncode == 3
    line = _one_line(result.stderr)
    assert "diverged in epoch 0" in line and "lower --lr" in line
    assert RunDir(tmp_path / "run").metrics() == []


@pytest.mark.reference
def test_divergence_after_good_epochs_keeps_them_and_their_model(tiny_artifacts, tmp_path, monkeypatch):
    """A NaN loss in epoch 2: epochs 0-1 stay committed, model.onnx comes from the best of them."""
    calls = {"n": 0}
    real = TrainingSession.train_step

    def step(self, images, labels, lr):
        loss, logits = real(self, images, labels, lr)
        calls["n"] += 1
        return (float("nan") if calls["n"] > 2 * steps_per_epoch + 3 else loss), logits

    steps_per_epoch = (541 - 1) // 32 + 1  # digits 0-4 train split
    monkeypatch.setattr(TrainingSession, "train_step", step)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(tiny_artifacts), *DIGITS_0_4, "--epochs", "4", "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "diverged in epoch 2" in result.output and "epochs 0-1 are kept" in result.output
    assert [int(r["epoch"]) for r in RunDir(out).metrics()] == [0, 1]
    evaluated = cli("eval", str(out), *DIGITS_0_4)
    assert evaluated.returncode == 0, evaluated.stderr


def test_checkpoint_with_nan_weights_is_not_resumed(tiny_artifacts, straight, tmp_path):
    """The newest checkpoint holds NaN weights (its checksum re-recorded, so only the check for
    finite weights can see it): resume falls back to the epoch before and ends as the straight run."""
    from onnx_neq.training.run_dir import sha256_file

    run = _interrupted(tiny_artifacts, tmp_path / "run")
    path = run.path / run.load_state().checkpoint
    session = TrainingSession(tiny_artifacts, path)  # ORT writes parameters only through a session's state
    name = session.manifest.layers[0].weight
    session.state.parameters[name] = np.full_like(session.parameter(name), np.nan)
    session.save_checkpoint(path)
    raw = json.loads((run.state_dir / "run_state.json").read_text())
    raw["checkpoints"][-1]["sha256"] = sha256_file(path)
    (run.state_dir / "run_state.json").write_text(json.dumps(raw))
    result = cli("train", "--out", str(run.path), "--resume")
    assert result.returncode == 0, result.stderr
    assert "non-finite weights" in result.stderr and "resuming from epoch 1" in result.stderr
    _same_run(straight, run.path, tiny_artifacts)


# 4. one writer per run directory ------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_runs(tiny_artifacts, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(tiny_artifacts), *DIGITS_0_4, "--epochs", "1000", "--batch-size", "4", "--out", str(out)]
    first = subprocess.Popen(cli_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.csv").exists():
            time.sleep(0.05)
        second = cli(*args)
        resume = cli("train", "--out", str(out), "--resume")
        for result in (second, resume):
            assert result.returncode == 2 and "in use by another onnx-neq process" in _one_line(result.stderr)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    epochs = [int(r["epoch"]) for r in RunDir(out).metrics()]
    assert epochs == sorted(set(epochs))


def test_metrics_are_keyed_by_epoch(tiny_artifacts, straight, tmp_path):
    """Rows written twice (as two writers once did) count once; the report reads by epoch."""
    from onnx_neq.results.report import summarize

    copy = tmp_path / "run"
    shutil.copytree(straight, copy)
    text = (copy / "metrics.csv").read_text().splitlines()
    (copy / "metrics.csv").write_text("\n".join([text[0], *text[1:], *text[1:3]]) + "\n")
    run = RunDir(copy)
    assert [int(r["epoch"]) for r in run.metrics()] == [0, 1, 2, 3]
    best = run.load_state().best_epoch
    assert summarize(copy).test_at_best_val == float(run.metrics_by_epoch()[best]["test_top1"])


# 5. resume that does not break where it need not ------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "deleted", "velocity_corrupted"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(damage, tiny_artifacts, straight, tmp_path):
    run = _interrupted(tiny_artifacts, tmp_path / "run")  # epochs 0-2 committed
    record = run.load_state().record(2)
    if damage == "truncated":
        path = run.path / record.file
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "deleted":
        (run.path / record.file).unlink()
    else:
        (run.path / record.velocity).write_bytes(b"garbage")
    result = cli("train", "--out", str(run.path), "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming from epoch 1" in result.stderr and record.file.split("/")[-1] in result.stderr
    _same_run(straight, run.path, tiny_artifacts)


def test_every_checkpoint_damaged_is_one_line(tiny_artifacts, tmp_path):
    run = _interrupted(tiny_artifacts, tmp_path / "run")
    for record in run.load_state().checkpoints:
        (run.path / record.file).write_bytes(b"")
    result = cli("train", "--out", str(run.path), "--resume")
    assert result.returncode == 2 and "no intact checkpoint" in _one_line(result.stderr)


@pytest.mark.parametrize("file", ["state/run_state.json", "settings.json"])
def test_corrupted_state_files_are_one_line(file, tiny_artifacts, tmp_path):
    run = _interrupted(tiny_artifacts, tmp_path / "run")
    (run.path / file).write_text('{"epoch": 2, "best')
    result = cli("train", "--out", str(run.path), "--resume")
    assert result.returncode == 2 and "is corrupted" in _one_line(result.stderr)


def test_resume_from_another_directory_with_relative_paths(tiny_artifacts, straight, tmp_path):
    shutil.copytree(tiny_artifacts, tmp_path / "work" / "art")
    (tmp_path / "elsewhere").mkdir()
    os.chdir(tmp_path / "work")
    try:
        _interrupted("art", Path("run"))
    finally:
        os.chdir(Path(__file__).parent)
    result = cli("train", "--out", str(tmp_path / "work" / "run"), "--resume", cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    assert _rows(RunDir(tmp_path / "work" / "run")) == _rows(RunDir(straight))


def test_resume_refuses_artifacts_prepared_again(tiny_onnx, tmp_path):
    from onnx_neq.graph.prepare import prepare

    prepare(tiny_onnx[0], tmp_path / "art")
    _interrupted(tmp_path / "art", tmp_path / "run")
    prepare(tiny_onnx[0], tmp_path / "art", seed=1, num_classes=5)  # same shapes, another head
    result = cli("train", "--out", str(tmp_path / "run"), "--resume")
    assert result.returncode == 2 and "changed since" in _one_line(result.stderr)


def test_resume_refuses_changed_settings_and_extends_epochs_explicitly(tiny_artifacts, tmp_path):
    run = _interrupted(tiny_artifacts, tmp_path / "run")
    refused = cli("train", "--out", str(run.path), "--resume", "--epochs", "12", "--lr", "0.5")
    assert refused.returncode == 2
    line = _one_line(refused.stderr)
    assert "--lr 0.5" in line and "--epochs 12" not in line
    shorter = cli("train", "--out", str(run.path), "--resume", "--epochs", "2")
    assert shorter.returncode == 2 and "fewer than the 3 epochs" in _one_line(shorter.stderr)
    extended = cli("train", "--out", str(run.path), "--resume", "--epochs", "6")
    assert extended.returncode == 0, extended.stderr
    assert "schedule changed from 4 to 6 epochs" in extended.stderr
    assert [int(r["epoch"]) for r in run.metrics()] == list(range(6))
    assert json.loads((run.path / "settings.json").read_text())["config"]["epochs"] == 6


# 6. the environment fails ------------------------------------------------------------------------------


def test_disk_full_while_checkpointing_is_one_line_leaves_no_temporary_and_resumes(tiny_artifacts, straight, tmp_path, monkeypatch):
    """ORT fails to write the third checkpoint (leaving half a file) on a disk with no space left."""
    from onnx_neq.ort_runtime import training_api

    api = training_api()
    real = api.CheckpointState.save_checkpoint

    def full(state, path, include_optimizer_state=False):
        Path(path).write_bytes(b"partial")
        if "epoch_002" in str(path):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : failed to write checkpoint")
        real(state, path, include_optimizer_state=include_optimizer_state)

    monkeypatch.setattr(api.CheckpointState, "save_checkpoint", staticmethod(full))
    monkeypatch.setattr("shutil.disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", str(tiny_artifacts), *DIGITS_0_4, "--epochs", "4", "--warmup-epochs", "1", "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.output and f"onnx-neq train --out {out} --resume" in result.output
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    resumed = cli("train", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same_run(straight, out, tiny_artifacts)


def test_unwritable_output_is_one_line(tiny_artifacts, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if "readonly" in str(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "readonly" / "run"
    result = CliRunner().invoke(main, ["train", str(tiny_artifacts), *DIGITS_0_4, "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 2
    assert "Read-only file system" in result.output and str(out) in result.output


def test_a_file_where_the_run_directory_should_be(tiny_artifacts, tmp_path):
    (tmp_path / "file").write_text("")
    result = cli("train", str(tiny_artifacts), *DIGITS_0_4, "--out", str(tmp_path / "file" / "run"))
    assert result.returncode == 2 and str(tmp_path / "file") in _one_line(result.stderr)


def test_ctrl_c_exits_130_with_the_resume_command(tiny_artifacts, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli_command("train", str(tiny_artifacts), *DIGITS_0_4, "--epochs", "1000", "--batch-size", "4", "--out", str(out)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.csv").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert f"onnx-neq train --out {out} --resume" in _one_line(stderr)


# 8. errors raised inside graph passes -----------------------------------------------------------------


def test_error_inside_a_pass_is_the_users_one_line(tmp_path):
    import onnx
    from conftest import onnx_model
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("ReduceMean", ["c"], ["y"], axes=[2, 3], keepdims=0)]
    model = onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w],
    )
    onnx.save(model, str(tmp_path / "no_head.onnx"))
    result = cli("prepare", str(tmp_path / "no_head.onnx"), "-o", str(tmp_path / "art"), "--num-classes", "3")
    assert result.returncode == 2 and "no Gemm or MatMul+Add classifier" in _one_line(result.stderr)
    assert not (tmp_path / "art").exists()


def test_num_classes_on_a_paddle_style_classifier(tmp_path, rng):
    """Constant-node weights, bias + x @ W, Softmax output, opset 11: normalized, then the head replaced."""
    import onnx
    from conftest import onnx_model
    from onnx import TensorProto, helper, numpy_helper

    def constant(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array.astype(np.float32), name))

    nodes = [
        constant("w", rng.standard_normal((6, 3, 3, 3)) * 0.3),
        constant("fc", rng.standard_normal((6, 4)) * 0.3),
        constant("fb", rng.standard_normal(4) * 0.1),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["m"]),
        helper.make_node("Add", ["fb", "m"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    model = onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])],
        opset=11,
    )
    onnx.save(model, str(tmp_path / "paddle.onnx"))
    result = cli("prepare", str(tmp_path / "paddle.onnx"), "-o", str(tmp_path / "art") + "/", "--num-classes", "5")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'art'}/:" in result.stdout  # one slash, as typed
    trained = cli("train", str(tmp_path / "art"), *DIGITS_0_4, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr


# 9. small things -----------------------------------------------------------------------------------------


class _Tty:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return True


def test_live_rows_count_epochs_like_the_table_and_are_not_printed_twice(monkeypatch):
    import click

    from onnx_neq.cli import _Progress

    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(click.utils, "_default_text_stderr", lambda: tty)
    progress = _Progress()
    progress("step", {"epoch": 0, "epochs": 30, "step": 1, "steps": 10, "loss": 1.0})
    assert "epoch 0 of 0-29" in tty.text
    row = dict.fromkeys(["lr", "train_loss", "train_top1", "val_top1", "test_top1", "epoch_seconds"], "0.5")
    progress("epoch", {**row, "epoch": 0, "updated_params": 1, "selected_neurons": 1})
    assert progress.shown_live(tty) and not progress.shown_live(open(os.devnull, "w"))


def test_export_says_the_weights_are_random(tmp_path):
    result = cli("export", "mobilenet_v2", "--width-mult", "0.35", "--resolution", "32", "-o", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    assert "weights are random" in result.stderr


def test_cached_artifacts_from_an_older_version_are_prepared_again(tiny_artifacts, tmp_path):
    """A head fitted earlier by a version without the portable files is rebuilt, not trained broken."""
    from onnx_neq.training.default_model import artifacts_with_head

    fitted = artifacts_with_head(tiny_artifacts, 10)
    (fitted / "portable_training_model.onnx").unlink()
    assert artifacts_with_head(tiny_artifacts, 10) == fitted
    assert (fitted / "portable_training_model.onnx").exists()
