"""The run directory: what a user reads, and what `--resume` continues from.

RUN/settings.json             the run's settings (budget resolved, data, artifacts path + fingerprint)
RUN/metrics.csv               one row per finished epoch, keyed by the epoch column
RUN/masks/epoch_NNN.npz       the per-layer masks trained in that epoch
RUN/velocity/epoch_NNN.npz    phi and velocity per neuron (manifest layer order) after that epoch
RUN/state/epoch_NNN.ckpt      backend checkpoint (parameters + optimizer state) after that epoch
RUN/state/velocity_NNN.npz    velocity buffers after that epoch (what the next selection needs)
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
import csv
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.training.run_lock import LOCK_NAME
from onnx_neq.typed_json import build, read_json

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
    "step_ms",  # mean training step
    "update_bytes",  # gradients + optimizer state the backend held for the update
    "backward_macs",  # backward multiply-accumulates per image the backend computed
    "specialize_seconds",  # building the training graph specialised to this epoch's selection
    "cost_params",  # this epoch's selection under each cost model (docs/ALGORITHM.md, "Cost models")
    "cost_macs",  # backward MACs per image (blank: the model has no static shapes)
    "cost_bytes",  # training memory in bytes at the run's batch size (blank: no static shapes)
    "probe_seconds",  # gradient statistics for gradnorm / fisher (probe batches)
]


@dataclass
class CheckpointRecord:
    epoch: int
    file: str  # relative to the run directory
    sha256: str
    velocity: str
    velocity_sha256: str


@dataclass
class RunState:
    epoch: int = -1  # last finished epoch (-1: none)
    best_epoch: int = -1
    best_val: float = -1.0
    reference_loss: float | None = None  # loss of the run's first step (divergence is judged against it)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)

    def record(self, epoch: int) -> CheckpointRecord | None:
        return next((r for r in self.checkpoints if r.epoch == epoch), None)

    @property
    def checkpoint(self) -> str | None:
        record = self.record(self.epoch)
        return record.file if record else None

    @property
    def best_checkpoint(self) -> str | None:
        record = self.record(self.best_epoch)
        return record.file if record else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


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
        if self.path.exists() and (not self.path.is_dir() or any(p.name != LOCK_NAME for p in self.path.iterdir())):
            raise NeqError(f"{self.path} exists and is not an empty directory; choose another --out")

    def create(self, settings: dict) -> None:
        for d in (self.path, self.masks, self.velocity, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.write_settings(settings)
        atomic_write_bytes(self.path / "metrics.csv", (",".join(METRICS) + "\n").encode())

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
                    _remove(file)
        for folder in (self.masks, self.velocity, self.state_dir):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    def remove_if_unused(self) -> None:
        """Remove the run folder when it holds nothing but its lock file (the run never started)."""
        with contextlib.suppress(OSError):
            if {p.name for p in self.path.iterdir()} <= {LOCK_NAME}:
                _remove(self.path / LOCK_NAME)
                self.path.rmdir()

    def write_settings(self, settings: dict) -> None:
        atomic_write_bytes(self.path / "settings.json", json.dumps(settings, indent=1).encode())

    def settings(self) -> dict:
        if not self.exists():
            raise NeqError(f"{self.path} holds no run to resume (no settings.json); start one without --resume")
        return _read_json(self.path / "settings.json")

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
            _remove(tmp)
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

    # metrics, keyed by epoch ----------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        """Add (or replace) the row of row['epoch']."""
        rows = [r for r in self.metrics() if int(r["epoch"]) != int(row["epoch"])]
        rows.append({k: row.get(k, "") for k in METRICS})
        self._write_metrics(sorted(rows, key=lambda r: int(r["epoch"])))

    def metrics(self, upto: int | None = None) -> list[dict]:
        """One row per epoch (the last written wins), in epoch order."""
        path = self.path / "metrics.csv"
        if not path.exists():
            return []
        with open(path, newline="") as f:
            by_epoch = {int(r["epoch"]): r for r in csv.DictReader(f) if r.get("epoch", "").lstrip("-").isdigit()}
        return [by_epoch[e] for e in sorted(by_epoch) if upto is None or e <= upto]

    def metrics_by_epoch(self) -> dict[int, dict]:
        return {int(r["epoch"]): r for r in self.metrics()}

    def truncate_metrics(self, upto: int) -> None:
        """Drop rows of epochs after the last committed one (a run killed between the two writes)."""
        self._write_metrics(self.metrics(upto))

    def _write_metrics(self, rows: list[dict]) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, METRICS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path / "metrics.csv", out.getvalue().encode())

    # commit and resume ----------------------------------------------------------------------
    def commit(self, state: RunState, checkpoint: tuple[str, str], velocity: dict[str, np.ndarray]) -> RunState:
        """Record the epoch state.epoch as finished: its checkpoint, velocity buffers, run_state.json."""
        buffer = io.BytesIO()
        np.savez(buffer, **velocity)
        velocity_file = self.state_dir / f"velocity_{state.epoch:03d}.npz"
        atomic_write_bytes(velocity_file, buffer.getvalue())
        record = CheckpointRecord(
            state.epoch,
            checkpoint[0],
            checkpoint[1],
            str(velocity_file.relative_to(self.path)),
            hashlib.sha256(buffer.getvalue()).hexdigest(),
        )
        kept = [r for r in state.checkpoints if r.epoch != state.epoch] + [record]
        state.checkpoints = self._kept(kept, state.epoch)
        atomic_write_bytes(self.state_dir / "run_state.json", json.dumps(asdict(state), indent=1).encode())
        self._drop_unrecorded(state)
        return state

    def _kept(self, records: list[CheckpointRecord], latest: int) -> list[CheckpointRecord]:
        """The two newest epochs and the best epoch as of each of them."""
        epochs = sorted(r.epoch for r in records if r.epoch <= latest)[-2:]
        rows = self.metrics()
        keep = set(epochs) | {best_upto(rows, e)[0] for e in epochs}
        return sorted((r for r in records if r.epoch in keep), key=lambda r: r.epoch)

    def _drop_unrecorded(self, state: RunState) -> None:
        recorded = {r.file for r in state.checkpoints} | {r.velocity for r in state.checkpoints}
        for file in [*self.state_dir.glob("epoch_*.ckpt"), *self.state_dir.glob("velocity_*.npz")]:
            if str(file.relative_to(self.path)) not in recorded:
                _remove(file)

    def load_state(self) -> RunState:
        path = self.state_dir / "run_state.json"
        if not path.exists():
            return RunState()
        state = build(RunState, _read_json(path), str(path), "start a new run with another --out")
        for record in state.checkpoints:
            for rel in (record.file, record.velocity):
                if not (self.path / rel).resolve().is_relative_to(self.state_dir.resolve()):
                    raise NeqError(f"{path} names {rel!r}, outside {self.state_dir}; start a new run with another --out")
        return state

    def resume_point(self, check: Callable[[Path], str | None]) -> tuple[RunState, dict[str, np.ndarray], list[str]]:
        """The newest committed epoch whose checkpoint and velocity buffers are intact, (state, velocity
        arrays, notes). `check(path)` returns a problem with a checkpoint that hashes cannot see (e.g.
        non-finite weights), or None."""
        state = self.load_state()
        if state.epoch < 0:
            return state, {}, []
        notes = []
        for record in sorted((r for r in state.checkpoints if r.epoch <= state.epoch), key=lambda r: -r.epoch):
            problem = self._damage(record) or check(self.path / record.file)
            if problem is None:
                if record.epoch != state.epoch:
                    notes.append(f"resuming from epoch {record.epoch}, the newest intact checkpoint")
                    state = self._rolled_back(state, record.epoch)
                return state, self._load_velocity(record), notes
            notes.append(f"{self.path / record.file}: {problem}")
        raise NeqError(f"no intact checkpoint to resume {self.path} from ({'; '.join(notes)}); start the run again with another --out")

    def _damage(self, record: CheckpointRecord) -> str | None:
        for rel, digest in ((record.file, record.sha256), (record.velocity, record.velocity_sha256)):
            path = self.path / rel
            if not path.exists():
                return f"{rel} is missing"
            if sha256_file(path) != digest:
                return f"{rel} is corrupted (its sha256 differs from the one recorded when it was written)"
        return None

    def _rolled_back(self, state: RunState, epoch: int) -> RunState:
        best_epoch, best_val = best_upto(self.metrics(), epoch)
        if state.record(best_epoch) is None:  # never expected: the best as of every kept epoch is kept
            best_epoch, best_val = epoch, float(self.metrics_by_epoch()[epoch]["val_top1"])
        return RunState(epoch, best_epoch, best_val, state.reference_loss, [r for r in state.checkpoints if r.epoch <= epoch])

    def _load_velocity(self, record: CheckpointRecord) -> dict[str, np.ndarray]:
        with np.load(self.path / record.velocity) as z:
            return {k: z[k] for k in z.files}


def best_upto(rows: list[dict], epoch: int) -> tuple[int, float]:
    """(epoch, val top-1) of the best validation epoch among metrics rows of epochs <= epoch (the earliest on ties)."""
    best = (-1, -1.0)
    for row in rows:
        if int(row["epoch"]) <= epoch and float(row["val_top1"]) > best[1]:
            best = (int(row["epoch"]), float(row["val_top1"]))
    return best


def _read_json(path: Path) -> dict:
    return read_json(path, "the run cannot continue from it: start a new run with another --out")
