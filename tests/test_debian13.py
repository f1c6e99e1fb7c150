"""Debian 13 (marker `e2e`): README's install and commands on trixie's Python 3.13 with stock onnxruntime,
no onnxruntime-training, in a chroot that .ci/debian13.sh builds and caches (a few minutes; needs root)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "debian13.sh"
TIMEOUT = 40 * 60


def test_debian13_install_prepare_train_eval_and_the_default_run():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, mount, chroot)")
    missing = [tool for tool in ("apt-get", "chroot") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs a Debian-like host: {', '.join(missing)} not found")
    # Own process group: on a timeout the script gets SIGTERM (its trap unmounts the chroot's /proc and /dev)
    # rather than a SIGKILL that would leave them mounted.
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        pytest.fail(f".ci/debian13.sh ran over {TIMEOUT} s; output:\n{output[-6000:]}")
    tail = output[-6000:]
    assert proc.returncode == 0, tail
    lines = output.splitlines()
    assert "debian13: PASS" in lines, tail
    assert any(re.match(r"python: 3\.13\.\d+ ", line) for line in lines), tail
    assert any(line.startswith("onnxruntime.training: absent") for line in lines), tail
