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
    from onnx_neq.data import load_dataset, select_classes

    data = select_classes(load_dataset("digits"), [0, 1, 2, 3, 4])
    np.savez(path, x_train=data.train.images, y_train=data.train.labels, x_test=data.test.images, y_test=data.test.labels)
    return path


def test_stock_onnxruntime_trains_artifacts_prepared_elsewhere(tiny_onnx, tiny_artifacts, tmp_path):
    python = _venv(tmp_path / "venv", "onnxruntime", "numpy", "click", "onnx>=1.17", "onnx-ir==1.1.0", "onnxscript==0.7.2")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True, timeout=600)
    probe = subprocess.run(
        [str(python), "-c", "import onnxruntime, importlib.util as u; print(onnxruntime.__version__, u.find_spec('onnxruntime.training'))"],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0 and probe.stdout.split()[1] == "None", probe.stdout + probe.stderr
    cli = str(tmp_path / "venv" / "bin" / "onnx-neq")
    data = _digits_npz(tmp_path / "digits.npz")
    run = subprocess.run(
        [
            cli,
            "train",
            str(tiny_artifacts),
            "--backend",
            "portable",
            "--data",
            f"npz:{data}",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "model.onnx").exists()
    default = subprocess.run(
        [cli, "train", str(tiny_artifacts), "--data", f"npz:{data}", "--epochs", "1", "--out", str(tmp_path / "run2")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert default.returncode == 0, default.stderr  # portable is the default where onnxruntime-training is missing
    prepare = subprocess.run([cli, "prepare", str(tiny_onnx[0]), "-o", str(tmp_path / "art")], capture_output=True, text=True, timeout=600)
    assert prepare.returncode == 2
    lines = [line for line in prepare.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "onnxruntime-training" in lines[0], prepare.stderr
    assert not (tmp_path / "art").exists()


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
