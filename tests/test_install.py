"""Fresh installs (marker `e2e`): stock onnxruntime only, as on a board; and a non-editable install
of the package, which must carry the shipped model."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def _venv(path: Path, *requirements: str) -> Path:
    venv.create(path, with_pip=True)
    python = path / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True, timeout=1200)
    return python


def _digits_npz(path: Path) -> Path:
    from onnx_neq.data.datasets import load_dataset, select_classes

    data = select_classes(load_dataset("digits"), [0, 1, 2, 3, 4])
    np.savez(path, x_train=data.train.images, y_train=data.train.labels, x_test=data.test.images, y_test=data.test.labels)
    return path


def _cli(tmp_path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(tmp_path / "venv" / "bin" / "onnx-neq"), *args], capture_output=True, text=True, timeout=900, cwd=cwd)


def test_stock_onnxruntime_prepares_and_trains(tiny_onnx, tiny_artifacts, tmp_path):
    """pip install of the package alone: stock onnxruntime and the newest onnx, no onnxruntime-training; prepare
    writes the portable artifacts with onnx-neq's gradient builder, train runs them (and artifacts prepared
    in the reference environment), and `--backend ort-training` is one line naming the reference setup."""
    python = _venv(tmp_path / "venv", f"{ROOT}[report]")
    probe = subprocess.run(
        [str(python), "-c", "import onnxruntime, importlib.util as u; print(onnxruntime.__version__, u.find_spec('onnxruntime.training'))"],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0 and probe.stdout.split()[1] == "None", probe.stdout + probe.stderr
    data = _digits_npz(tmp_path / "digits.npz")
    prepare = _cli(tmp_path, "prepare", str(tiny_onnx[0]), "-o", str(tmp_path / "art"), cwd=tmp_path)
    assert prepare.returncode == 0, prepare.stderr
    assert "no ORT-training artifacts" in prepare.stdout and not (tmp_path / "art" / "training_model.onnx").exists()
    for artifacts, out in ((tmp_path / "art", "run"), (tiny_artifacts, "run-elsewhere")):
        run = _cli(tmp_path, "train", str(artifacts), "--data", f"npz:{data}", "--epochs", "2", "--out", str(tmp_path / out), cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert (tmp_path / out / "model.onnx").exists()
    refused = _cli(
        tmp_path, "train", str(tmp_path / "art"), "--backend", "ort-training", "--data", f"npz:{data}", "--out", "r3", cwd=tmp_path
    )
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and "onnxruntime-training" in lines[0], refused.stderr
    _everything_readme_shows(tmp_path, data)


def _everything_readme_shows(tmp_path: Path, data: Path) -> None:
    """On stock onnxruntime: the shipped model prepared, trained with every selector and both cost models
    (tiny runs), then eval, export-inference, compare and report."""
    art = tmp_path / "shipped"
    prepared = _cli(tmp_path, "prepare", str(ROOT / "onnx_neq" / "models" / "mobilenet_v2_035_fmnist04.onnx"), "-o", str(art), cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    small = ["--data", f"npz:{data}", "--epochs", "2", "--warmup-epochs", "1", "--train-limit", "64", "--batch-size", "16"]
    variants = {s: ["--selector", s] for s in ("velocity", "random", "su", "full", "neq", "gradnorm", "fisher")}
    variants.update({"compute": ["--cost", "compute"], "memory": ["--cost", "memory"]})
    for name, options in variants.items():
        run = _cli(tmp_path, "train", str(art), *small, *options, "--out", str(tmp_path / "runs" / name), cwd=tmp_path)
        assert run.returncode == 0, f"{name}: {run.stderr}"
    evaluated = _cli(tmp_path, "eval", str(tmp_path / "runs" / "velocity"), "--data", f"npz:{data}", cwd=tmp_path)
    assert evaluated.returncode == 0 and "top-1" in evaluated.stdout, evaluated.stderr
    exported = _cli(tmp_path, "export-inference", str(art), "-o", str(tmp_path / "inference.onnx"), cwd=tmp_path)
    assert exported.returncode == 0 and (tmp_path / "inference.onnx").exists(), exported.stderr
    compared = _cli(
        tmp_path, "compare", str(art), "--methods", "velocity,random", "--budget-ratios", "0.3", "--seeds", "0", "--epochs", "1",
        "--train-limit", "64", "--batch-size", "16", "--warmup-epochs", "0", "--data", f"npz:{data}", "--out", str(tmp_path / "compare"),
        cwd=tmp_path,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    reported = _cli(
        tmp_path, "report", *(str(tmp_path / "runs" / n) for n in ("velocity", "random")), "--out", str(tmp_path / "report"), cwd=tmp_path
    )
    assert reported.returncode == 0 and any((tmp_path / "report").glob("*.png")), reported.stderr


def test_non_editable_install_carries_the_shipped_model(tmp_path):
    python = _venv(tmp_path / "venv", f"{ROOT}[data]")
    cli = str(tmp_path / "venv" / "bin" / "onnx-neq")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": f"{tmp_path / 'venv' / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run(
        [cli, "train", "--epochs", "1", "--train-limit", "200", "--out", "run"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=work,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "mobilenet_v2_035_fmnist04.onnx" in result.stderr and (work / "run" / "model.onnx").exists()
    where = subprocess.run([str(python), "-c", "import onnx_neq; print(onnx_neq.__file__)"], capture_output=True, text=True, cwd=work)
    assert str(tmp_path / "venv") in where.stdout
