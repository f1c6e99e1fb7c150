"""The training loop, and the Policy that tells it what to train.

TrainingLoop runs the epochs of one run: per epoch it asks its policy which neurons train, sets the
backend's masks, steps through the shuffled training batches (warm-up + cosine learning rate), checks
for divergence, evaluates validation and test top-1, and commits the epoch (checkpoint, masks, the
policy's files and state, the metrics row) so a run killed at any moment resumes from its last epoch.

A Policy is called at fixed points (every hook has a do-nothing default):

    start(loop, saved)           once, before the first epoch this process runs (saved: Policy.state() of
                                 the epoch resumed from, {} for a new run)
    before_epoch(epoch)    ->    the neurons to train: bool over every neuron, manifest layer order
    before_step(step)            before each training step (may change step.lr)
    after_step(step)             after it (step.loss, step.logits set; loop.apply() changes the masks)
    after_epoch(epoch, selected) -> its metrics columns (training/metrics.py), after the evaluation
    save(run, epoch)             its files of the epoch, before the commit
    state()               ->     arrays that start() needs to continue after this epoch (saved with it)

The default policy, SelectorPolicy (selector_policy.py), selects with a registered selector each epoch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnx_neq.backends.base import Backend, open_backend
from onnx_neq.data.datasets import Split
from onnx_neq.errors import DivergedError
from onnx_neq.manifest import Manifest
from onnx_neq.selection.selectors import split_by_layer
from onnx_neq.training import metrics
from onnx_neq.training.config import TrainConfig
from onnx_neq.training.divergence import DivergenceGuard
from onnx_neq.training.evaluate import record_normalization
from onnx_neq.training.run_dir import RunDir, RunState
from onnx_neq.training.schedule import learning_rate
from onnx_neq.training.setup import RunData, prep

Progress = Callable[[str, dict], None]


@dataclass
class Step:
    """One training step as the policy sees it."""

    epoch: int
    index: int  # within the epoch, from 0
    iteration: int  # within the run: epoch * steps_per_epoch + index
    lr: float  # the schedule's; before_step may change it
    images: np.ndarray  # preprocessed, NCHW
    labels: np.ndarray
    loss: float = float("nan")  # set after the step
    logits: np.ndarray | None = None


class Policy:
    """What a TrainingLoop trains; see the module docstring for when each hook runs. This base trains
    every neuron every epoch, adds no column and keeps no state."""

    loop: TrainingLoop

    def start(self, loop: TrainingLoop, saved: dict[str, np.ndarray]) -> None:
        """Once, before the first epoch this process runs; `saved`: what state() returned at the epoch resumed from."""
        self.loop = loop

    def before_epoch(self, epoch: int) -> np.ndarray:
        """The neurons that train this epoch: bool over every neuron, manifest layer order."""
        return np.ones(self.loop.manifest.neurons, bool)

    def before_step(self, step: Step) -> None:
        """Before each training step; may change step.lr."""

    def after_step(self, step: Step) -> None:
        """After each training step (step.loss, step.logits set); self.loop.apply(selected) changes the masks."""

    def after_epoch(self, epoch: int, selected: np.ndarray) -> dict[str, Any]:
        """After the epoch's steps and evaluation: this policy's metrics columns ({column: value})."""
        return {}

    def save(self, run: RunDir, epoch: int) -> None:
        """This policy's files of the epoch, written before the epoch's commit."""

    def state(self) -> dict[str, np.ndarray]:
        """What start() needs to continue after this epoch (saved with the epoch's checkpoint)."""
        return {}


@dataclass
class LoopResult:
    run_dir: Path
    rows: list[dict]
    best_epoch: int
    best_val: float
    test_at_best_val: float


@dataclass
class _Totals:
    """An epoch's training steps so far, and the columns they make."""

    losses: list[float] = field(default_factory=list)  # each step's loss x its images
    correct: int = 0
    seen: int = 0
    stepping: float = 0.0  # seconds inside train_step
    lr: float = 0.0

    def add(self, step: Step, seconds: float) -> None:
        self.losses.append(step.loss * len(step.labels))
        self.correct += int((step.logits.argmax(1) == step.labels).sum())
        self.seen += len(step.labels)
        self.stepping += seconds
        self.lr = step.lr

    @property
    def loss(self) -> float:
        return sum(self.losses) / self.seen

    def columns(self) -> dict[str, Any]:
        return {
            metrics.LR: self.lr,
            metrics.TRAIN_LOSS: self.loss,
            metrics.TRAIN_TOP1: self.correct / self.seen,
            metrics.STEP_MS: 1000 * self.stepping / max(1, len(self.losses)),
        }


class TrainingLoop:
    """The epochs of one run on an open backend (`session`), written into `run`; see the module docstring."""

    def __init__(
        self, config: TrainConfig, manifest: Manifest, data: RunData, session: Backend, run: RunDir, policy: Policy, progress: Progress
    ):
        self.config, self.manifest, self.data, self.session, self.run_dir = config, manifest, data, session, run
        self.policy, self.progress = policy, progress
        self.layer_sizes = [layer.out_channels for layer in manifest.layers]
        self.layer_names = [layer.name for layer in manifest.layers]
        self.steps_per_epoch = len(self.batches(0))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = self.steps_per_epoch * min(config.warmup_epochs, config.epochs - 1)
        self.masks: dict[str, np.ndarray] = {}
        self.specialize_seconds = 0.0
        self.state = RunState()

    def run(self, state: RunState | None = None, saved: dict[str, np.ndarray] | None = None) -> LoopResult:
        """Every epoch after `state.epoch` (a new run: all of them), then model.onnx from the best one."""
        self.begin(state or RunState(), saved or {})
        try:
            for epoch in range(self.state.epoch + 1, self.config.epochs):
                self.run_epoch(epoch)
        except DivergedError as exc:
            raise DivergedError(f"{exc}; {self._kept()}; lower --lr (this run: {self.config.lr:g}) and start a new run") from None
        return self.finish()

    def begin(self, state: RunState, saved: dict[str, np.ndarray]) -> None:
        """Continue after `state` (RunState(): a new run); `saved`: the policy's state at that epoch."""
        self.state = state
        self.policy.start(self, saved)
        self.guard = DivergenceGuard(state.reference_loss, self.manifest.num_classes)
        self.run_dir.truncate_metrics(state.epoch)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Select, train, evaluate and commit one epoch; returns its metrics row."""
        start, self.specialize_seconds = time.perf_counter(), 0.0
        selected = self.policy.before_epoch(epoch)
        self.apply(selected)
        totals = self._train_epoch(epoch)
        self.guard.epoch(epoch, totals.loss)
        DivergenceGuard.weights(epoch, self.session.parameters())
        val, test = self.top1(self.data.val), self.top1(self.data.test)
        columns = {metrics.EPOCH: epoch, **totals.columns(), metrics.VAL_TOP1: val, metrics.TEST_TOP1: test}
        columns.update(self.policy.after_epoch(epoch, selected))
        columns.update({metrics.UPDATE_BYTES: self.session.update_bytes(), metrics.BACKWARD_MACS: self.session.backward_macs()})
        columns.update({metrics.SPECIALIZE_SECONDS: self.specialize_seconds, metrics.EPOCH_SECONDS: time.perf_counter() - start})
        row = metrics.metrics_row(columns)
        self._commit(epoch, row, val)
        self.progress("epoch", row)
        return row

    def apply(self, selected: np.ndarray) -> None:
        """Train the neurons `selected` (bool over every neuron) from the next step on."""
        self.masks = dict(zip(self.layer_names, split_by_layer(selected, self.layer_sizes)))
        before = getattr(self.session, "specialize_seconds", 0.0)
        self.session.set_masks(self.masks)
        self.specialize_seconds += getattr(self.session, "specialize_seconds", 0.0) - before

    def finish(self) -> LoopResult:
        """model.onnx from the best validation epoch, and the run's rows."""
        self._export_best()
        rows = self.run_dir.metrics()
        by_epoch = {int(r[metrics.EPOCH]): r for r in rows}
        best = self.state.best_epoch
        test = float(by_epoch[best][metrics.TEST_TOP1]) if best in by_epoch else float("nan")
        return LoopResult(self.run_dir.path, rows, best, self.state.best_val, test)

    # one epoch -------------------------------------------------------------------------------
    def batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's training batches: indices into data.train, shuffled by the seed and the epoch."""
        return shuffled_batches(len(self.data.train), self.config.batch_size, self.config.seed, epoch)

    def _train_epoch(self, epoch: int) -> _Totals:
        batches, train, totals = self.batches(epoch), self.data.train, _Totals()
        for i, idx in enumerate(batches):
            iteration = epoch * self.steps_per_epoch + i
            lr = learning_rate(iteration, self.total_steps, self.config.lr, self.warmup_steps)
            step = Step(epoch, i, iteration, lr, prep(self.manifest, train.images[idx]), train.labels[idx])
            self.policy.before_step(step)
            start = time.perf_counter()
            step.loss, step.logits = self.session.train_step(step.images, step.labels, step.lr)
            seconds = time.perf_counter() - start
            self.guard.step(epoch, i, step.loss)
            self.policy.after_step(step)
            totals.add(step, seconds)
            self.progress("step", {"epoch": epoch, "epochs": self.config.epochs, "step": i + 1, "steps": len(batches), "loss": step.loss})
        return totals

    def top1(self, split: Split) -> float:
        return top1(self.session, self.manifest, split, self.config.eval_batch_size)

    # persistence ------------------------------------------------------------------------------
    def _commit(self, epoch: int, row: dict[str, Any], val: float) -> None:
        """Checkpoint, masks, the policy's files and the metrics row of the epoch, then the commit point
        (run_state.json, with the policy's state)."""
        checkpoint = self.run_dir.write_checkpoint(epoch, self.session.save_checkpoint)
        self.run_dir.save_masks(epoch, self.masks)
        self.policy.save(self.run_dir, epoch)
        self.run_dir.append_metrics(row)
        state = self.state
        better = val > state.best_val
        state = RunState(epoch, epoch if better else state.best_epoch, max(val, state.best_val), self.guard.reference, state.checkpoints)
        self.state = self.run_dir.commit(state, checkpoint, self.policy.state())

    def _kept(self) -> str:
        """After a divergence: what the run keeps (model.onnx from the best epoch before it)."""
        if self.state.epoch < 0:
            return "no epoch finished, so there is no model.onnx"
        self._export_best()
        return f"epochs 0-{self.state.epoch} are kept and model.onnx holds the best of them (epoch {self.state.best_epoch})"

    def _export_best(self) -> None:
        if self.state.best_checkpoint is not None:
            export_model(self.config, self.manifest, self.run_dir.path / self.state.best_checkpoint, self.run_dir.path / "model.onnx")


TRAINING_STREAM, PROBE_STREAM = 2, 4  # the random streams of an epoch's training and probe batches


def shuffled_batches(size: int, batch_size: int, seed: int, epoch: int, stream: int = TRAINING_STREAM) -> list[np.ndarray]:
    """An epoch's batches of indices into `size` training images, in the order of (seed, epoch, stream)."""
    order = np.random.default_rng([seed, epoch, stream]).permutation(size)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [b for b in batches if len(b) >= 2]  # a batch of one breaks batch-statistics BatchNorm


def top1(session: Backend, manifest: Manifest, split: Split, batch_size: int) -> float:
    correct = 0
    for i in range(0, len(split), batch_size):
        logits = session.eval_logits(prep(manifest, split.images[i : i + batch_size]))
        correct += int((logits.argmax(1) == split.labels[i : i + batch_size]).sum())
    return correct / max(1, len(split))


def export_model(config: TrainConfig, manifest: Manifest, checkpoint: Path, path: Path) -> None:
    """The inference model of `checkpoint` at `path` (written beside it, then renamed into place)."""
    best = open_backend(config.backend, config.artifacts, checkpoint, threads=config.threads, **config.backend_options())
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        best.export_inference(tmp)
        record_normalization(tmp, manifest.input.mean, manifest.input.std)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
