"""The run directory: what a user reads, and what `--resume` continues from.

RUN/settings.json             the run's settings (budget resolved, data, artifacts path + fingerprint)
RUN/metrics.csv               one row per finished epoch, keyed by the epoch column (training/metrics.py)
RUN/masks/epoch_NNN.npz       the per-layer masks trained in that epoch
RUN/velocity/epoch_NNN.npz    phi and velocity per neuron (manifest layer order) after that epoch
RUN/state/epoch_NNN.ckpt      backend checkpoint (parameters + optimizer state) after that epoch
RUN/state/velocity_NNN.npz    the policy's state after that epoch (velocity buffers: what the next selection needs)
RUN/state/run_state.json      the commit point: last finished epoch, best epoch, kept checkpoints + sha256
RUN/model.onnx                inference model (weights of the best validation epoch), at the end
RUN/.lock                     held by the process writing the run (see run_lock.py)

Every file is written to a temporary name and renamed into place (a failed write removes its
temporary), and run_state.json is written last, so a run killed at any moment resumes from its
last finished epoch. The two newest checkpoints and the best epoch's (as of each) are kept; each
is recorded with its sha256, so a corrupted or missing newest checkpoint falls back to the one before.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.training.checkpoints import Checkpoints, RunState
from onnx_neq.training.files import atomic_write_bytes, read_run_json, remove, sha256_file
from onnx_neq.training.metrics import EPOCH, MetricsFile
from onnx_neq.training.run_lock import LOCK_NAME

__all__ = ["RunDir", "RunState", "sha256_file"]


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.masks = self.path / "masks"
        self.velocity = self.path / "velocity"
        self.state_dir = self.path / "state"
        self.metrics_file = MetricsFile(self.path / "metrics.csv")
        self.checkpoints = Checkpoints(self.path, self.metrics)

    # creation ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "settings.json").exists()

    def check_new(self) -> None:
        if self.exists():
            raise NeqError(f"{self.path} already holds a run; pass --resume to continue it, or choose another --out")
        if self.path.exists() and (not self.path.is_dir() or any(p.name != LOCK_NAME for p in self.path.iterdir())):
            raise NeqError(f"{self.path} exists and is not an empty directory; choose another --out")

    def create(self, settings: dict) -> None:
        for d in (self.path, self.masks, self.velocity, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.write_settings(settings)
        self.metrics_file.create()

    def committed(self) -> bool:
        """True once an epoch has been committed (run_state.json written)."""
        return (self.state_dir / "run_state.json").exists()

    def discard(self) -> None:
        """Remove what create() and an uncommitted epoch wrote, and nothing else: a run that failed before
        its first epoch leaves nothing that blocks the same --out."""
        patterns = {self.path: ("settings.json", "metrics.csv", ".*.tmp"), self.masks: ("epoch_*.npz", ".*.tmp")}
        patterns.update({self.velocity: ("epoch_*.npz", ".*.tmp"), self.state_dir: ("epoch_*.ckpt", "velocity_*.npz", ".*.tmp")})
        for folder, globs in patterns.items():
            for pattern in globs:
                for file in folder.glob(pattern):
                    remove(file)
        for folder in (self.masks, self.velocity, self.state_dir):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    def remove_if_unused(self) -> None:
        """Remove the run folder when it holds nothing but its lock file (the run never started)."""
        with contextlib.suppress(OSError):
            if {p.name for p in self.path.iterdir()} <= {LOCK_NAME}:
                remove(self.path / LOCK_NAME)
                self.path.rmdir()

    def write_settings(self, settings: dict) -> None:
        atomic_write_bytes(self.path / "settings.json", json.dumps(settings, indent=1).encode())

    def settings(self) -> dict:
        if not self.exists():
            raise NeqError(f"{self.path} holds no run to resume (no settings.json); start one without --resume")
        return read_run_json(self.path / "settings.json")

    # per epoch ---------------------------------------------------------------------------
    def checkpoint_path(self, epoch: int) -> Path:
        return self.state_dir / f"epoch_{epoch:03d}.ckpt"

    def write_checkpoint(self, epoch: int, save: Callable[[Path], None]) -> tuple[str, str]:
        """Write a checkpoint through `save(tmp_path)`, then rename it into place: (relative file, sha256).
        A failed write leaves no temporary behind."""
        final = self.checkpoint_path(epoch)
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            save(tmp)
            digest = sha256_file(tmp)
            os.replace(tmp, final)
        except BaseException:
            remove(tmp)
            raise
        return str(final.relative_to(self.path)), digest

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

    # metrics, keyed by epoch (training/metrics.py) -------------------------------------------
    def append_metrics(self, row: dict) -> None:
        """Add (or replace) the row of the row's epoch."""
        self.metrics_file.append(row)

    def metrics(self, upto: int | None = None) -> list[dict]:
        """One row per epoch (the last written wins), in epoch order."""
        return self.metrics_file.rows(upto)

    def metrics_by_epoch(self) -> dict[int, dict]:
        return {int(r[EPOCH]): r for r in self.metrics()}

    def truncate_metrics(self, upto: int) -> None:
        """Drop rows of epochs after the last committed one (a run killed between the two writes)."""
        self.metrics_file.truncate(upto)

    # commit and resume (training/checkpoints.py) ----------------------------------------------
    def commit(self, state: RunState, checkpoint: tuple[str, str], saved: dict[str, np.ndarray]) -> RunState:
        """Record the epoch state.epoch as finished: its checkpoint, the policy's state, run_state.json."""
        return self.checkpoints.commit(state, checkpoint, saved)

    def load_state(self) -> RunState:
        return self.checkpoints.load_state()

    def resume_point(self, check: Callable[[Path], str | None]) -> tuple[RunState, dict[str, np.ndarray], list[str]]:
        """See Checkpoints.resume_point."""
        return self.checkpoints.resume_point(check)
