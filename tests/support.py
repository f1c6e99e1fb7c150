"""Helpers shared by test files (fixtures are in conftest.py): the CLI in a subprocess, the onnx light zoo.

Import as `from support import cli, LIGHT_ZOO` (pytest puts this folder on sys.path with conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent

# onnx's own test models (AlexNet, GoogLeNet, SqueezeNet, ...): third-party exports shipped with the onnx package
LIGHT_ZOO = sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("light_*.onnx"))


def cli_command(*args: str) -> list[str]:
    """The argv of `onnx-neq ARGS` with this interpreter."""
    return [sys.executable, "-m", "onnx_neq.cli", *args]


def cli(*args: str, cwd=None, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`onnx-neq ARGS` in a subprocess, output captured as text; the caller checks the exit status."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def kill_after_lines(args: list[str], watched: Path, lines: int, timeout: float = 300) -> None:
    """Start `onnx-neq ARGS`, SIGKILL it once `watched` has `lines` lines (or after `timeout` s), and reap it."""
    import os
    import signal
    import time

    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and (not watched.exists() or len(watched.read_text().splitlines()) < lines):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
