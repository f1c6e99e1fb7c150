"""Settings, new or stored in a run's settings.json, are checked before anything runs or is written:
each case reproduces a finding of the issue "Untrusted files and unusual models"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnx_neq.cli import main
from onnx_neq.training.run_dir import RunDir

TINY = ["--epochs", "2", "--warmup-epochs", "0", "--batch-size", "8", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("own_cache")  # a cache of its own per test


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Five classes of 8x8 images a tiny CNN can tell apart (class c is brightest in channel c % 3)."""
    rng = np.random.default_rng(1)
    y = np.arange(150) % 5
    x = rng.integers(0, 80, (150, 8, 8, 3)).astype(np.uint8)
    x[np.arange(150), :, :, y % 3] += (40 * (1 + y // 3)).astype(np.uint8)[:, None, None]
    path = tmp_path_factory.mktemp("data") / "d.npz"
    np.savez(path, x_train=x[:120], y_train=y[:120], x_test=x[120:], y_test=y[120:])
    return path


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *needles: str, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("onnx-neq:")]
    assert len(lines) == 1 and lines[0].startswith("onnx-neq: error:") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--mu", "nan"], "--mu"),
        (["--eps", "nan"], "--eps"),
        (["--budget-ratio", "inf"], "--budget-ratio"),
        (["--seed", "-1"], "--seed"),
        (["--memory-pattern", "--backend", "ort-training"], "--memory-pattern"),
        (["--bn-update", "selected", "--backend", "portable"], "--bn-update selected"),
    ],
)
def test_settings_out_of_range_are_one_line_and_leave_no_run(flags, needle, tiny_artifacts, data, tmp_path):
    out = tmp_path / "run"
    _one_line_error(_cli("train", tiny_artifacts, "--data", f"npz:{data}", "--out", out, *TINY, *flags), needle)
    assert not out.exists()


def test_bn_update_selected_without_a_backend_runs_where_it_is_honoured(tiny_artifacts, data, tmp_path):
    """--bn-update selected without --backend was ignored: the run stored the full backward pass."""
    common = ["train", tiny_artifacts, "--data", f"npz:{data}", *TINY, "--budget-ratio", "0.3", "--selector", "random"]
    selected = _cli(*common, "--bn-update", "selected", "--out", tmp_path / "selected")
    assert selected.exit_code == 0, selected.stderr
    assert "backend   specialized" in selected.stderr
    assert json.loads((tmp_path / "selected" / "settings.json").read_text())["config"]["backend"] == "specialized"
    full = _cli(*common, "--backend", "portable", "--out", tmp_path / "full")
    assert full.exit_code == 0, full.stderr
    sel_bytes = [int(r["update_bytes"]) for r in RunDir(tmp_path / "selected").metrics()]
    full_bytes = [int(r["update_bytes"]) for r in RunDir(tmp_path / "full").metrics()]
    assert max(sel_bytes) < min(full_bytes)


@pytest.fixture(scope="module")
def finished(tiny_artifacts, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    result = _cli("train", tiny_artifacts, "--data", f"npz:{data}", "--out", out, *TINY, "--backend", "portable")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("velocity_images", 0, "--velocity-images"),
        ("lr", -1, "--lr"),
        ("lr", "abc", "config.lr"),
        ("epochs", 2.5, "config.epochs"),
        ("selector", "rm -rf", "--selector"),
        ("batch_size", 10**12, "--batch-size"),
        ("backend", None, None),  # a run from before the portable backend: resumes on ort-training, refused by nothing
    ],
)
def test_stored_settings_are_checked_like_new_ones_and_not_rewritten(field, value, needle, finished, tmp_path):
    """--resume trusted settings.json (velocity_images 0 crashed onnxruntime with SIGFPE, lr -1 trained
    with a negative rate) and rewrote it before its checks failed."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    settings = json.loads((run / "settings.json").read_text())
    settings["config"][field] = value
    (run / "settings.json").write_text(json.dumps(settings))
    before = (run / "settings.json").read_bytes()
    result = _cli("train", "--out", run, "--resume", "--epochs", "3")
    if needle is None:
        assert result.exit_code in (0, 2), result.stderr
        return
    _one_line_error(result, needle)
    assert (run / "settings.json").read_bytes() == before


@pytest.mark.parametrize("text", ["[1, 2]", '{"config": [], "artifacts": {}}', '{"config": {}, "artifacts": "x"}', "\x00\xff"])
def test_settings_that_are_not_ours_are_one_line(text, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "settings.json").write_bytes(text.encode("latin-1"))
    _one_line_error(_cli("train", "--out", run, "--resume"), "settings.json")


def test_run_state_cannot_point_outside_the_run(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    state = json.loads((run / "state" / "run_state.json").read_text())
    state["checkpoints"][-1]["file"] = "../../secret.npz"
    (run / "state" / "run_state.json").write_text(json.dumps(state))
    _one_line_error(_cli("train", "--out", run, "--resume", "--epochs", "3"), "outside")


def test_a_run_that_cannot_start_leaves_nothing_that_blocks_the_retry(tiny_artifacts, data, tmp_path, monkeypatch):
    """`--backend ort-training` where onnxruntime-training is missing left a folder that blocked the
    retry its own message advised."""
    import onnx_neq.backends.base as base

    out = tmp_path / "run"
    monkeypatch.setattr(base, "training_kernels_available", lambda: False)
    _one_line_error(_cli("train", tiny_artifacts, "--data", f"npz:{data}", "--out", out, *TINY, "--backend", "ort-training"), "portable")
    assert not out.exists()
    retry = _cli("train", tiny_artifacts, "--data", f"npz:{data}", "--out", out, *TINY, "--backend", "portable")
    assert retry.exit_code == 0, retry.stderr


def test_a_run_diverging_in_its_first_epoch_can_be_retried_on_the_same_out(tiny_artifacts, data, tmp_path):
    out = tmp_path / "run"
    diverged = _cli("train", tiny_artifacts, "--data", f"npz:{data}", "--out", out, *TINY, "--backend", "portable", "--lr", "1e6")
    _one_line_error(diverged, "diverged in epoch 0", code=3)
    retry = _cli("train", tiny_artifacts, "--data", f"npz:{data}", "--out", out, *TINY, "--backend", "portable")
    assert retry.exit_code == 0, retry.stderr


def test_a_damaged_artifacts_folder_leaves_no_run_behind(tiny_artifacts, data, tmp_path):
    """A damaged artifacts folder left a run folder that blocked the same --out ('already holds a run')."""
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    (art / "eval_model.onnx").write_bytes((art / "eval_model.onnx").read_bytes()[:200])
    out = tmp_path / "run"
    _one_line_error(_cli("train", art, "--data", f"npz:{data}", "--out", out, *TINY, "--backend", "portable"), "eval_model.onnx")
    assert not out.exists()


@pytest.mark.parametrize("ratio", ['"abc"', "NaN", "-1", "2", "true", "[0.5]"])
def test_sparse_update_scheme_ratios_are_checked(ratio, tiny_artifacts, data, tmp_path):
    """A Sparse Update scheme ratio "abc" ended in exit 1."""
    scheme = tmp_path / "scheme.json"
    scheme.write_text('{"layers": {"0": ' + ratio + "}}")
    result = _cli(
        "train", tiny_artifacts, "--data", f"npz:{data}", "--out", tmp_path / "run", *TINY, "--selector", "su", "--su-scheme", scheme
    )
    _one_line_error(result, "scheme")


def test_a_setting_missing_from_settings_json_takes_its_default(finished, tmp_path):
    """A key removed from settings.json crashed the resume (KeyError)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    settings = json.loads((run / "settings.json").read_text())
    del settings["config"]["epochs"]
    (run / "settings.json").write_text(json.dumps(settings))
    result = _cli("train", "--out", run, "--resume", "--epochs", "3")
    assert result.exit_code == 0, result.stderr
    assert [int(r["epoch"]) for r in RunDir(run).metrics()] == [0, 1, 2]
