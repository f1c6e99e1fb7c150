"""Files someone hands us: prepare deletes nothing it did not write, models and artifacts cannot make us
read outside their folder or allocate what their bytes do not hold. Each case reproduces a finding of
the issue "Untrusted files and unusual models"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnx_neq.cli import main

SECRET = b"top secret \x01\x02\x03\x04" * 64


def _cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("onnx-neq:")]
    assert len(lines) == 1 and lines[0].startswith("onnx-neq: error:") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# prepare's output folder ------------------------------------------------------------------------


def test_prepare_into_the_working_folder_deletes_nothing(tiny_onnx, tmp_path, monkeypatch):
    """`prepare m.onnx -o .` in a folder holding the model, a manifest.json and a thesis left it empty."""
    shutil.copy(tiny_onnx[0], tmp_path / "m.onnx")
    (tmp_path / "manifest.json").write_text('{"not": "ours"}')
    (tmp_path / "thesis.tex").write_text("four years of work")
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    _one_line_error(_cli("prepare", "m.onnx", "-o", "."), "working folder")
    assert _tree(tmp_path) == before


def test_prepare_refuses_the_folder_holding_its_input(tiny_onnx, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_onnx[0], models / "m.onnx")
    _one_line_error(_cli("prepare", str(models / "m.onnx"), "-o", str(models)), "holds the input model")
    assert (models / "m.onnx").exists()


def test_a_foreign_manifest_does_not_make_a_folder_ours(tiny_onnx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    _one_line_error(_cli("prepare", str(tiny_onnx[0]), "-o", str(out)), "did not write", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").read_text() == "{}"


def test_extra_files_in_real_artifacts_are_kept(tiny_artifacts, tiny_onnx, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    (art / "my_results.csv").write_text("a,b\n")
    before = _tree(art)
    _one_line_error(_cli("prepare", str(tiny_onnx[0]), "-o", str(art)), "my_results.csv")
    assert _tree(art) == before


def test_prepare_replaces_its_own_artifacts(tiny_artifacts, tiny_onnx, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    manifest = json.loads((art / "manifest.json").read_text())
    result = _cli("prepare", str(tiny_onnx[0]), "-o", str(art), "--optimizer", "adamw")
    assert result.exit_code == 0, result.stderr
    assert json.loads((art / "manifest.json").read_text())["optimizer"] == "adamw" != manifest["optimizer"]
    assert not list(tmp_path.glob(".art.partial-*"))


def test_a_symlinked_output_folder_is_refused(tiny_onnx, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    _one_line_error(_cli("prepare", str(tiny_onnx[0]), "-o", str(tmp_path / "link")), "not a directory")


def test_staging_of_a_sigkilled_prepare_is_cleaned_up_by_the_next(tiny_onnx, tmp_path):
    """A prepare killed with SIGKILL left .NAME.partial-PID folders that nothing removed."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnx_neq.cli", "prepare", str(tiny_onnx[0]), "-o", str(tmp_path / "art")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".art.partial-*"))
    assert left, "the prepare finished before it could be killed"
    foreign = tmp_path / ".art.partial-1"  # not ours: no staging mark (and pid 1 lives)
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    result = _cli("prepare", str(tiny_onnx[0]), "-o", str(tmp_path / "art"))
    assert result.exit_code == 0, result.stderr
    assert sorted(tmp_path.glob(".art.partial-*")) == [foreign] and (foreign / "keep.txt").exists()


# models that point outside, or declare what they do not hold -------------------------------------


def _with_external_weights(tiny_onnx: Path, folder: Path, location: str) -> Path:
    """The tiny model with its initializers in an external file, then pointed at `location`."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(tiny_onnx))
    path = folder / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.bin", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_model_folder_is_never_read(kind, tiny_onnx, tmp_path):
    """An external-data location (absolute, '..', or a symlink) made onnx-neq read any file."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET * 100)
    folder = tmp_path / "model"
    location = {"absolute": str(secret), "dotdot": "../secret.bin", "symlink": "link.bin"}[kind]
    path = _with_external_weights(tiny_onnx[0], folder, location)
    if kind == "symlink":
        (folder / "link.bin").symlink_to(secret)
    _one_line_error(_cli("prepare", str(path), "-o", str(tmp_path / "art")), "outside the folder")
    assert not (tmp_path / "art").exists()


def test_external_data_inside_the_folder_still_prepares(tiny_onnx, tmp_path):
    path = _with_external_weights(tiny_onnx[0], tmp_path / "model", "m.bin")
    result = _cli("prepare", str(path), "-o", str(tmp_path / "art"))
    assert result.exit_code == 0, result.stderr


def test_a_tensor_declaring_trillions_of_values_is_refused_before_allocation(tmp_path):
    """A 482-byte model whose tensor declares 3e12 elements asked for terabytes."""
    weight = onnx.TensorProto(name="w", dims=[3, 1000000, 1000000, 1], data_type=onnx.TensorProto.FLOAT, raw_data=b"\0" * 16)
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [conv, helper.make_node("GlobalAveragePool", ["y"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1000000, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "bomb.onnx"
    onnx.save(model, str(path))
    assert path.stat().st_size < 1000
    start = time.monotonic()
    _one_line_error(_cli("prepare", str(path), "-o", str(tmp_path / "art")), "declares")
    assert time.monotonic() - start < 30


def _copy_artifacts(tiny_artifacts: Path, tmp_path: Path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    return art


def _npz(path: Path, rng) -> Path:
    x = rng.integers(0, 255, (80, 8, 8, 3), dtype=np.uint8)
    y = np.arange(80) % 5
    np.savez(path, x_train=x[:60], y_train=y[:60], x_test=x[60:], y_test=y[60:])
    return path


@pytest.mark.parametrize("backend", ["portable", "ort-training"])
def test_artifact_model_with_external_data_outside_is_refused(backend, tiny_artifacts, tmp_path, rng):
    """A model's external-data location in the artifacts made onnxruntime open /etc/passwd."""
    art = _copy_artifacts(tiny_artifacts, tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET * 100)
    model = onnx.load(str(art / "eval_model.onnx"))
    tensor = model.graph.initializer.add(name="stolen", dims=[64], data_type=onnx.TensorProto.FLOAT)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=str(secret))
    onnx.save(model, str(art / "eval_model.onnx"))
    data = _npz(tmp_path / "d.npz", rng)
    out = tmp_path / "run"
    _one_line_error(_cli("train", str(art), "--data", f"npz:{data}", "--out", str(out), "--backend", backend, "--epochs", "1"), "outside")
    assert not (out / "settings.json").exists()


@pytest.mark.parametrize("entry", ["../secret.bin", "/etc/passwd", "link"])
def test_manifest_files_cannot_point_outside(entry, tiny_artifacts, tmp_path, rng):
    art = _copy_artifacts(tiny_artifacts, tmp_path)
    (tmp_path / "secret.bin").write_bytes(SECRET)
    if entry == "link":
        (art / "link").symlink_to(tmp_path / "secret.bin")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["parameters"] = entry
    (art / "manifest.json").write_text(json.dumps(manifest))
    data = _npz(tmp_path / "d.npz", rng)
    result = _cli("train", str(art), "--data", f"npz:{data}", "--out", str(tmp_path / "run"), "--backend", "portable")
    _one_line_error(result, "outside")


@pytest.mark.parametrize(
    "field,value",
    [("num_classes", "five"), ("layers", [{"name": 3}]), ("input", {"name": "x", "shape": [None, 3, 8, 10**9], "mean": [0], "std": [1]})],
)
def test_a_manifest_of_the_wrong_shape_is_one_line(field, value, tiny_artifacts, tmp_path, rng):
    """A damaged manifest ended in exit 1."""
    art = _copy_artifacts(tiny_artifacts, tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest[field] = value
    (art / "manifest.json").write_text(json.dumps(manifest))
    data = _npz(tmp_path / "d.npz", rng)
    _one_line_error(_cli("train", str(art), "--data", f"npz:{data}", "--out", str(tmp_path / "run")), "manifest.json")
    _one_line_error(_cli("export-inference", str(art), "-o", str(tmp_path / "m.onnx")), "manifest.json")


def test_damaged_parameters_are_one_line_and_leave_no_run(tiny_artifacts, tmp_path, rng):
    art = _copy_artifacts(tiny_artifacts, tmp_path)
    params = dict(np.load(art / "parameters.npz"))
    name = next(k for k, v in params.items() if v.ndim == 4 and v.shape[1] > 1)
    params[name] = params[name][:, :1]
    np.savez(art / "parameters.npz", **params)
    data = _npz(tmp_path / "d.npz", rng)
    out = tmp_path / "run"
    _one_line_error(_cli("train", str(art), "--data", f"npz:{data}", "--out", str(out), "--backend", "portable"), name)
    assert not (out / "settings.json").exists()


def test_the_model_tensor_check_matches_numpy(tmp_path):
    """A sane model loads; its tensors are what numpy reads (the check does not alter them)."""
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2, 3, 3])],
            [numpy_helper.from_array(w, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    from onnx_neq.model_io import load_model

    np.testing.assert_array_equal(numpy_helper.to_array(load_model(tmp_path / "m.onnx").graph.initializer[0]), w)


def test_a_tensor_holding_more_bytes_than_it_declares_is_refused(tiny_onnx, tmp_path):
    """onnxruntime refuses it too, but with native log lines and an error from deep inside."""
    model = onnx.load(str(tiny_onnx[0]))
    tensor = next(t for t in model.graph.initializer if len(t.dims) == 4)
    tensor.dims[0] -= 1
    onnx.save(model, str(tmp_path / "m.onnx"))
    _one_line_error(_cli("prepare", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "art")), "declares shape", tensor.name)


@pytest.mark.parametrize("damage", ["no_image_input", "bad_normalization"])
def test_eval_of_a_model_that_is_not_ours_is_one_line(damage, tiny_onnx, tmp_path, rng):
    from onnx_neq.training.evaluate import record_normalization

    path = tmp_path / "m.onnx"
    shutil.copy(tiny_onnx[0], path)
    record_normalization(path, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    model = onnx.load(str(path))
    if damage == "no_image_input":
        del model.graph.input[0].type.tensor_type.shape.dim[2:]
    else:
        model.metadata_props[1].value = "nan,0,1"
    onnx.save(model, str(path))
    _one_line_error(_cli("eval", str(path), "--data", f"npz:{_npz(tmp_path / 'd.npz', rng)}"), str(path))
