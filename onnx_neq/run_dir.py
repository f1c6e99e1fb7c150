"""The run directory: what a user reads, and what `--resume` continues from.

RUN/settings.json          the run's settings (budget resolved, data, manifest totals)
RUN/metrics.csv            one row per finished epoch
RUN/masks/epoch_NNN.npz    the per-layer masks trained in that epoch
RUN/velocity/epoch_NNN.npz phi and velocity per neuron (manifest layer order) after that epoch
RUN/state/epoch_NNN.ckpt   ORT checkpoint (parameters + optimizer state) after that epoch
RUN/state/run_state.json   the commit point: last finished epoch, best validation epoch
RUN/state/velocity.npz     velocity buffers after the last finished epoch
RUN/model.onnx             inference model (weights of the best validation epoch), at the end

Every file is written to a temporary name and renamed into place, and run_state.json is written
last, so a run killed at any moment resumes from its last finished epoch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import NeqError

METRICS = [
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "val_top1",
    "test_top1",
    "updated_params",
    "budget",
    "selected_neurons",
    "epoch_seconds",
    "selection_seconds",
]


@dataclass
class RunState:
    epoch: int  # last finished epoch (-1: none)
    best_epoch: int
    best_val: float
    checkpoint: str | None
    best_checkpoint: str | None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.masks = self.path / "masks"
        self.velocity = self.path / "velocity"
        self.state_dir = self.path / "state"

    # creation ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "settings.json").exists()

    def check_new(self) -> None:
        if self.exists():
            raise NeqError(f"{self.path} already holds a run; pass --resume to continue it, or choose another --out")
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise NeqError(f"{self.path} exists and is not an empty directory; choose another --out")

    def create(self, settings: dict) -> None:
        for d in (self.path, self.masks, self.velocity, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / "settings.json", json.dumps(settings, indent=1).encode())
        atomic_write_bytes(self.path / "metrics.csv", (",".join(METRICS) + "\n").encode())

    def settings(self) -> dict:
        if not self.exists():
            raise NeqError(f"{self.path} holds no run to resume (no settings.json); start one without --resume")
        return json.loads((self.path / "settings.json").read_text())

    # per epoch ---------------------------------------------------------------------------
    def checkpoint_path(self, epoch: int) -> Path:
        return self.state_dir / f"epoch_{epoch:03d}.ckpt"

    def save_masks(self, epoch: int, masks: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: m.astype(np.uint8) for name, m in masks.items()})
        atomic_write_bytes(self.masks / f"epoch_{epoch:03d}.npz", buffer.getvalue())

    def save_velocity(self, epoch: int, phi: np.ndarray, velocity: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, phi=phi, velocity=velocity)
        atomic_write_bytes(self.velocity / f"epoch_{epoch:03d}.npz", buffer.getvalue())

    def load_masks(self, epoch: int) -> dict[str, np.ndarray]:
        with np.load(self.masks / f"epoch_{epoch:03d}.npz") as z:
            return {k: z[k].astype(np.float32) for k in z.files}

    def append_metrics(self, row: dict) -> None:
        rows = self.metrics()
        rows.append({k: row[k] for k in METRICS})
        out = io.StringIO()
        writer = csv.DictWriter(out, METRICS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path / "metrics.csv", out.getvalue().encode())

    def metrics(self, upto: int | None = None) -> list[dict]:
        path = self.path / "metrics.csv"
        if not path.exists():
            return []
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [r for r in rows if upto is None or int(r["epoch"]) <= upto]

    def truncate_metrics(self, upto: int) -> None:
        """Drop rows of epochs after the last committed one (a run killed between the two writes)."""
        rows = self.metrics(upto)
        out = io.StringIO()
        writer = csv.DictWriter(out, METRICS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path / "metrics.csv", out.getvalue().encode())

    def commit(self, state: RunState, velocity: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **velocity)
        atomic_write_bytes(self.state_dir / "velocity.npz", buffer.getvalue())
        atomic_write_bytes(self.state_dir / "run_state.json", json.dumps(state.__dict__, indent=1).encode())
        self._drop_old_checkpoints(keep={state.checkpoint, state.best_checkpoint})

    def load_state(self) -> tuple[RunState, dict[str, np.ndarray]]:
        path = self.state_dir / "run_state.json"
        if not path.exists():
            return RunState(-1, -1, -1.0, None, None), {}
        state = RunState(**json.loads(path.read_text()))
        with np.load(self.state_dir / "velocity.npz") as z:
            velocity = {k: z[k] for k in z.files}
        return state, velocity

    def _drop_old_checkpoints(self, keep: set[str | None]) -> None:
        for ckpt in self.state_dir.glob("epoch_*.ckpt"):
            if str(ckpt.relative_to(self.path)) not in keep:
                shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
