"""The columns of a run's metrics.csv, defined once: the training loop and its policy fill them, RunDir
writes and reads them, the CLI, the run summary and the reports read them.

A Column is its name (a str, so a row is a plain dict keyed by it), how a value is written and what it
means. Adding a column: one entry in COLUMNS (in file order); the loop or a policy returns its value
(Policy.after_epoch), and runs written before it read it as blank.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from onnx_neq.training.files import atomic_write_bytes


class Column(str):
    """A metrics.csv column: the str is its name; `spec` formats numbers ("": written as given); a timing
    column holds wall-clock time (it differs between two runs of the same settings)."""

    spec: str
    meaning: str
    timing: bool

    def __new__(cls, name: str, spec: str, meaning: str, timing: bool = False) -> Column:
        column = super().__new__(cls, name)
        column.spec, column.meaning, column.timing = spec, meaning, timing
        return column

    def write(self, value: Any) -> Any:
        """The value as metrics.csv holds it: numbers formatted by `spec`; "" (no value) and ints as given."""
        return format(value, self.spec) if self.spec and value != "" else value


EPOCH = Column("epoch", "", "the epoch, from 0")
LR = Column("lr", ".6g", "learning rate of the epoch's last step")
TRAIN_LOSS = Column("train_loss", ".5f", "mean training loss over the epoch's steps")
TRAIN_TOP1 = Column("train_top1", ".4f", "top-1 on the training batches as they were trained")
VAL_TOP1 = Column("val_top1", ".4f", "top-1 on the validation split after the epoch")
TEST_TOP1 = Column("test_top1", ".4f", "top-1 on the test split after the epoch")
UPDATED_PARAMS = Column("updated_params", "", "conv parameters the epoch's selection trained")
BUDGET = Column("budget", "", "the budget, in the unit of the run's cost model")
SELECTED_NEURONS = Column("selected_neurons", "", "neurons the epoch's selection trained")
EPOCH_SECONDS = Column("epoch_seconds", ".3f", "the whole epoch", timing=True)
SELECTION_SECONDS = Column("selection_seconds", ".3f", "choosing the selection and measuring what it needs", timing=True)
STEP_MS = Column("step_ms", ".2f", "mean training step", timing=True)
UPDATE_BYTES = Column("update_bytes", "", "gradients + optimizer state the backend held for the update")
BACKWARD_MACS = Column("backward_macs", "", "backward multiply-accumulates per image the backend computed")
SPECIALIZE_SECONDS = Column("specialize_seconds", ".3f", "building the training graph specialised to the selection", timing=True)
# the epoch's selection under each cost model (docs/ALGORITHM.md, "Cost models"); blank: the model has no static shapes
COST_PARAMS = Column("cost_params", "", "selectable parameters (updated_params, beside its two siblings)")
COST_MACS = Column("cost_macs", "", "backward MACs per image")
COST_BYTES = Column("cost_bytes", "", "training memory in bytes at the run's batch size")
PROBE_SECONDS = Column("probe_seconds", ".3f", "gradient statistics for gradnorm / fisher (probe batches)", timing=True)
FLOPS_SAVED = Column(
    "flops_saved", ".4f", "1 - backward MACs of the epoch's selection / of full backpropagation (scotti: the mean over its steps)"
)

COLUMNS: tuple[Column, ...] = (
    EPOCH,
    LR,
    TRAIN_LOSS,
    TRAIN_TOP1,
    VAL_TOP1,
    TEST_TOP1,
    UPDATED_PARAMS,
    BUDGET,
    SELECTED_NEURONS,
    EPOCH_SECONDS,
    SELECTION_SECONDS,
    STEP_MS,
    UPDATE_BYTES,
    BACKWARD_MACS,
    SPECIALIZE_SECONDS,
    COST_PARAMS,
    COST_MACS,
    COST_BYTES,
    PROBE_SECONDS,
    FLOPS_SAVED,
)
TIMING = frozenset(c for c in COLUMNS if c.timing)  # what differs between two runs of the same settings
SPENT = {"params": UPDATED_PARAMS, "compute": COST_MACS, "memory": COST_BYTES}  # a selection's cost, per --cost


def metrics_row(values: dict[str, Any]) -> dict[str, Any]:
    """One epoch's row from the raw values of the loop and its policy, in column order, each written as
    its column says; a name that is no column is a bug (add it to COLUMNS)."""
    unknown = sorted(set(values) - set(COLUMNS))
    if unknown:
        raise KeyError(f"no metrics.csv column {unknown}: add it to onnx_neq/training/metrics.py")
    return {c: c.write(values[c]) for c in COLUMNS if c in values}


class MetricsFile:
    """RUN/metrics.csv: one row per finished epoch, keyed by the epoch column (the last written wins)."""

    def __init__(self, path: Path):
        self.path = path

    def create(self) -> None:
        atomic_write_bytes(self.path, (",".join(COLUMNS) + "\n").encode())

    def append(self, row: dict) -> None:
        """Add (or replace) the row of row[EPOCH]."""
        rows = [r for r in self.rows() if int(r[EPOCH]) != int(row[EPOCH])]
        rows.append({k: row.get(k, "") for k in COLUMNS})
        self._write(sorted(rows, key=lambda r: int(r[EPOCH])))

    def rows(self, upto: int | None = None) -> list[dict]:
        """One row per epoch, in epoch order (only epochs <= `upto` when given)."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            by_epoch = {int(r[EPOCH]): r for r in csv.DictReader(f) if r.get(EPOCH, "").lstrip("-").isdigit()}
        return [by_epoch[e] for e in sorted(by_epoch) if upto is None or e <= upto]

    def truncate(self, upto: int) -> None:
        """Drop rows of epochs after `upto` (the last committed one: a run killed between the two writes)."""
        self._write(self.rows(upto))

    def _write(self, rows: list[dict]) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, out.getvalue().encode())


def best_upto(rows: list[dict], epoch: int) -> tuple[int, float]:
    """(epoch, val top-1) of the best validation epoch among metrics rows of epochs <= epoch (the earliest on ties)."""
    best = (-1, -1.0)
    for row in rows:
        if int(row[EPOCH]) <= epoch and float(row[VAL_TOP1]) > best[1]:
            best = (int(row[EPOCH]), float(row[VAL_TOP1]))
    return best
