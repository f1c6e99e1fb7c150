"""`onnx-neq train` with no arguments: the shipped model fine-tuned on digits (real data)."""

from __future__ import annotations

import csv
import json
import os

import pytest
from support import ROOT, cli

pytestmark = pytest.mark.e2e  # 30 epochs: minutes


def test_no_argument_train_reaches_90_percent_on_digits(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    result = cli("train", cwd=tmp_path, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list((tmp_path / "runs").iterdir())
    settings = json.loads((run / "settings.json").read_text())
    assert settings["config"]["selector"] == "velocity" and settings["config"]["data"] == "digits"
    assert settings["budget"]["amount"] == int(settings["budget"]["total"] * 0.308)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 30
    assert all(int(r["updated_params"]) <= settings["budget"]["amount"] for r in rows)
    best = max(range(len(rows)), key=lambda i: (float(rows[i]["val_top1"]), -i))
    assert float(rows[best]["test_top1"]) >= 0.90
    assert "test top-1" in result.stdout and (run / "model.onnx").exists()
    readme = (ROOT / "README.md").read_text()
    assert f"{settings['data']['train']:,} training images" in readme  # the README describes this run
