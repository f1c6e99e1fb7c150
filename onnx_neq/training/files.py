"""Writing a run's files so that a reader never sees half of one: a temporary name, fsync, rename."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from onnx_neq.typed_json import read_json


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def read_run_json(path: Path) -> dict:
    return read_json(path, "the run cannot continue from it: start a new run with another --out")
