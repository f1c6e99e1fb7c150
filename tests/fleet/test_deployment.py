"""The deployment engine end to end: a SuperLink and three SuperNodes as processes on localhost run the app that
`onnx-neq fleet app` wrote for two rounds; one SuperNode is killed during the second round, the run completes,
and `onnx-neq eval` scores the global model. Also `fleet simulate` on the simulation engine, and its resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from support import cli, cli_command

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("own_cache")]
RECIPE = ["--data", "digits", "--classes", "0-4", "--batch-size", "16", "--train-limit", "200", "--threads", "1", "--budget-ratio", "0.3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scripts() -> Path:
    """Where flwr's commands are: beside this interpreter, or (a virtualenv with system site packages whose flwr
    came from the base install) in the base install's scripts folder."""
    here = Path(sys.executable).parent
    if (here / "flower-superlink").exists():
        return here
    base = Path(sysconfig.get_path("scripts", vars={"base": sys.base_prefix}))
    assert (base / "flower-superlink").exists(), f"flower-superlink is in neither {here} nor {base}: pip install flwr"
    return base


def _flower(name: str) -> str:
    return str(_scripts() / name)


def _rounds(out: Path) -> list[dict]:
    with open(out / "rounds.csv", newline="") as f:
        return list(csv.DictReader(f))


def _done(out: Path) -> int:
    try:
        return json.loads((out / "state.json").read_text())["round"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def _start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_superlink_and_three_supernodes_survive_a_killed_node(tiny_artifacts, tmp_path):
    app, out, link_port = tmp_path / "app", tmp_path / "fleet", _free_port()
    wrote = cli(
        "fleet", "app", str(app), "--artifacts", str(tiny_artifacts), "--out", str(out), "--clients", "3", "--rounds", "2",
        "--min-clients", "2", "--round-timeout", "120", "--superlink", f"127.0.0.1:{link_port}", *RECIPE,
    )  # fmt: skip
    assert wrote.returncode == 0, wrote.stderr
    assert "flower-supernode" in wrote.stdout and "flwr run" in wrote.stdout
    # The SuperLink and SuperNodes start flower-superexec and flwr-clientapp by name.
    env = {**os.environ, "FLWR_HOME": str(app / ".flwr"), "PATH": f"{_scripts()}{os.pathsep}{os.environ.get('PATH', '')}"}
    link = [_flower("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation", "--port", str(link_port)]
    procs = [_start([*link, "--database", str(tmp_path / "link.db")], tmp_path / "link.log", env)]
    try:
        time.sleep(3)
        for i in range(3):
            node = [_flower("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}", "--port", str(_free_port())]
            procs.append(_start([*node, "--node-config", f"partition-id={i} num-partitions=3"], tmp_path / f"node{i}.log", env))
        run = subprocess.run(
            [_flower("flwr"), "run", str(app), "local"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
        )
        assert run.returncode == 0, run.stdout + run.stderr
        deadline = time.time() + 600
        while _done(out) < 1 and time.time() < deadline:
            time.sleep(0.2)
        assert _done(out) == 1, (tmp_path / "link.log").read_text()[-3000:]
        os.killpg(procs[3].pid, signal.SIGKILL)  # the third SuperNode dies as round 2 starts
        while _done(out) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert _done(out) == 2, (tmp_path / "link.log").read_text()[-3000:]
    finally:
        _stop(procs)
    rows = _rounds(out)
    assert [r for r in rows if r["round"] == "1" and not r["note"]].__len__() == 3
    second = [r for r in rows if r["round"] == "2"]
    merged = [r for r in second if not r["note"]]
    assert len(merged) == 2 and "2" not in {r["client"] for r in merged}  # the killed node's update never arrived
    scored = cli("eval", str(out / "model.onnx"), "--data", "digits", "--classes", "0-4")
    assert scored.returncode == 0, scored.stderr
    top1 = float(scored.stdout.split("top-1 ")[1].split()[0])
    assert top1 == pytest.approx(float(second[0]["global_top1"]), abs=1e-4)


def test_simulate_runs_and_resumes(tiny_artifacts, tmp_path):
    out = tmp_path / "fleet"
    args = ["fleet", "simulate", str(tiny_artifacts), "--clients", "2", "--split", "iid", "--out", str(out), *RECIPE]
    first = cli(*args, "--rounds", "1")
    assert first.returncode == 0, first.stderr
    assert "global top-1" in first.stdout and _done(out) == 1
    again = cli(*args, "--rounds", "2")  # the same fleet, one round more: it continues after round 1
    assert again.returncode == 0, again.stderr
    rows = _rounds(out)
    assert [r["round"] for r in rows] == ["0", "1", "1", "2", "2"]
    assert rows[1]["global_top1"] == rows[2]["global_top1"]
    other = cli(*args, "--rounds", "2", "--lr", "0.5")
    assert other.returncode != 0 and "other settings" in other.stderr


def test_simulate_killed_mid_fleet_continues_from_its_last_round(tiny_artifacts, tmp_path):
    out = tmp_path / "fleet"
    args = ["fleet", "simulate", str(tiny_artifacts), "--clients", "2", "--rounds", "2", "--split", "iid", "--out", str(out), *RECIPE]
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while _done(out) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the server (and its simulated clients) die after round 1, during round 2
    proc.wait()
    assert _done(out) == 1
    before = _rounds(out)
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    rows = _rounds(out)
    assert rows[: len(before)] == before and [r["round"] for r in rows] == ["0", "1", "1", "2", "2"]
