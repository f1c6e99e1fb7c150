"""A run's commit points (RUN/state/): the checkpoint and the policy's state of each kept epoch, each
recorded with its sha256 in run_state.json, which is written last. The two newest epochs and the best
epoch as of each are kept, so a corrupted or missing newest checkpoint falls back to the one before."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.training.files import atomic_write_bytes, read_run_json, remove, sha256_file
from onnx_neq.training.metrics import EPOCH, VAL_TOP1, best_upto
from onnx_neq.typed_json import build


@dataclass
class CheckpointRecord:
    epoch: int
    file: str  # relative to the run directory
    sha256: str
    velocity: str  # the policy's state (Policy.state()), relative to the run directory; named for the first policy
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


class Checkpoints:
    """RUN/state/ of the run at `root`; `rows()` reads its metrics rows (the best epoch is judged on them)."""

    def __init__(self, root: Path, rows: Callable[[], list[dict]]):
        self.root, self.dir, self.rows = root, root / "state", rows

    def commit(self, state: RunState, checkpoint: tuple[str, str], saved: dict[str, np.ndarray]) -> RunState:
        """Record the epoch state.epoch as finished: its checkpoint, the policy's state, run_state.json."""
        buffer = io.BytesIO()
        np.savez(buffer, **saved)
        saved_file = self.dir / f"velocity_{state.epoch:03d}.npz"
        atomic_write_bytes(saved_file, buffer.getvalue())
        relative = str(saved_file.relative_to(self.root))
        record = CheckpointRecord(state.epoch, checkpoint[0], checkpoint[1], relative, hashlib.sha256(buffer.getvalue()).hexdigest())
        kept = [r for r in state.checkpoints if r.epoch != state.epoch] + [record]
        state.checkpoints = self._kept(kept, state.epoch)
        atomic_write_bytes(self.dir / "run_state.json", json.dumps(asdict(state), indent=1).encode())
        self._drop_unrecorded(state)
        return state

    def _kept(self, records: list[CheckpointRecord], latest: int) -> list[CheckpointRecord]:
        """The two newest epochs and the best epoch as of each of them."""
        epochs = sorted(r.epoch for r in records if r.epoch <= latest)[-2:]
        rows = self.rows()
        keep = set(epochs) | {best_upto(rows, e)[0] for e in epochs}
        return sorted((r for r in records if r.epoch in keep), key=lambda r: r.epoch)

    def _drop_unrecorded(self, state: RunState) -> None:
        recorded = {r.file for r in state.checkpoints} | {r.velocity for r in state.checkpoints}
        for file in [*self.dir.glob("epoch_*.ckpt"), *self.dir.glob("velocity_*.npz")]:
            if str(file.relative_to(self.root)) not in recorded:
                remove(file)

    def load_state(self) -> RunState:
        path = self.dir / "run_state.json"
        if not path.exists():
            return RunState()
        state = build(RunState, read_run_json(path), str(path), "start a new run with another --out")
        for record in state.checkpoints:
            for rel in (record.file, record.velocity):
                if not (self.root / rel).resolve().is_relative_to(self.dir.resolve()):
                    raise NeqError(f"{path} names {rel!r}, outside {self.dir}; start a new run with another --out")
        return state

    def resume_point(self, check: Callable[[Path], str | None]) -> tuple[RunState, dict[str, np.ndarray], list[str]]:
        """The newest committed epoch whose checkpoint and saved state are intact, (state, the policy's saved
        arrays, notes). `check(path)` returns a problem with a checkpoint that hashes cannot see (e.g.
        non-finite weights), or None."""
        state = self.load_state()
        if state.epoch < 0:
            return state, {}, []
        notes = []
        for record in sorted((r for r in state.checkpoints if r.epoch <= state.epoch), key=lambda r: -r.epoch):
            problem = self._damage(record) or check(self.root / record.file)
            if problem is None:
                if record.epoch != state.epoch:
                    notes.append(f"resuming from epoch {record.epoch}, the newest intact checkpoint")
                    state = self._rolled_back(state, record.epoch)
                return state, self._load_saved(record), notes
            notes.append(f"{self.root / record.file}: {problem}")
        raise NeqError(f"no intact checkpoint to resume {self.root} from ({'; '.join(notes)}); start the run again with another --out")

    def _damage(self, record: CheckpointRecord) -> str | None:
        for rel, digest in ((record.file, record.sha256), (record.velocity, record.velocity_sha256)):
            path = self.root / rel
            if not path.exists():
                return f"{rel} is missing"
            if sha256_file(path) != digest:
                return f"{rel} is corrupted (its sha256 differs from the one recorded when it was written)"
        return None

    def _rolled_back(self, state: RunState, epoch: int) -> RunState:
        rows = self.rows()
        best_epoch, best_val = best_upto(rows, epoch)
        if state.record(best_epoch) is None:  # never expected: the best as of every kept epoch is kept
            best_epoch, best_val = epoch, float({int(r[EPOCH]): r for r in rows}[epoch][VAL_TOP1])
        return RunState(epoch, best_epoch, best_val, state.reference_loss, [r for r in state.checkpoints if r.epoch <= epoch])

    def _load_saved(self, record: CheckpointRecord) -> dict[str, np.ndarray]:
        with np.load(self.root / record.velocity) as z:
            return {k: z[k] for k in z.files}
