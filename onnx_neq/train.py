"""`onnx-neq train`: budgeted fine-tuning on ONNX Runtime, masks chosen between epochs.

per epoch:  masks = selector(velocity, costs, budget)  ->  SGD/AdamW steps with the masks as inputs
            ->  val/test top-1  ->  taps of the velocity set  ->  phi  ->  velocity  ->  checkpoint
Imports no torch: the ORT side goes through ort_runtime, the selectors are numpy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .budget import Budget, resolve_budget
from .data import Dataset, Split, load_dataset, preprocess, select_classes, split_validation
from .errors import NeqError
from .evaluate import record_normalization
from .manifest import Manifest, read_manifest
from .run_dir import RunDir, RunState
from .schedule import learning_rate
from .selectors import select_full, select_neq, select_random, select_su, select_velocity, split_by_layer
from .session import TrainingSession, checkpoint_parameters
from .su_schemes import load_su_scheme
from .velocity import VelocityState, layer_phi

log = logging.getLogger(__name__)

SELECTORS = ("velocity", "random", "su", "full", "neq")
INITS = ("random", "su", "full")


@dataclass
class TrainConfig:
    artifacts: str
    data: str
    out: str
    budget: int | None = None
    budget_ratio: float | None = None
    selector: str = "velocity"
    init: str | None = None  # default: random, or full for neq (its warm-up epoch)
    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 32
    warmup_epochs: int = 5
    seed: int = 0
    velocity_images: int = 10
    mu: float = 0.5
    eps: float = 1e-3
    su_scheme: str | None = None
    backfill: bool = False
    recurrence: str = "code"
    classes: list[int] | None = None
    val_fraction: float = 0.2
    threads: int = 0
    eval_batch_size: int = 256
    budget_label: str | None = None  # how reports name this run's budget row (compare sets it)
    train_limit: int | None = None  # use a fixed stratified subset of this many training images

    def validate(self) -> None:
        if self.selector not in SELECTORS:
            raise NeqError(f"--selector must be one of {', '.join(SELECTORS)}, not {self.selector!r}")
        if self.init is not None and self.init not in INITS:
            raise NeqError(f"--init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise NeqError("--epochs must be >= 1, --batch-size >= 2 and --lr > 0")
        if not 0 < self.val_fraction < 1:
            raise NeqError("the validation fraction must lie strictly between 0 and 1")
        if self.velocity_images < 1:
            raise NeqError("--velocity-images must be at least 1")

    @property
    def first_epoch_init(self) -> str:
        return self.init or ("full" if self.selector == "neq" else "random")


@dataclass
class TrainResult:
    run_dir: Path
    rows: list[dict]
    best_epoch: int
    best_val: float
    test_at_best_val: float
    budget: Budget
    warnings: list[str] = field(default_factory=list)


Progress = Callable[[str, dict], None]


@dataclass
class _Data:
    train: Split
    val: Split
    test: Split
    velocity_set: np.ndarray
    num_classes: int


def train(config: TrainConfig, resume: bool = False, progress: Progress | None = None) -> TrainResult:
    """Run (or resume) a fine-tuning run into config.out; see TrainConfig for the settings."""
    progress = progress or (lambda event, info: None)
    run = RunDir(config.out)
    if resume:
        config = TrainConfig(**run.settings()["config"])
    else:
        run.check_new()
    config.validate()
    manifest = read_manifest(config.artifacts)
    data = _load_data(config, manifest)
    costs = np.concatenate([np.full(layer.out_channels, layer.neuron_cost, np.int64) for layer in manifest.layers])
    su_mask = _su_mask(config, manifest) if "su" in (config.selector, config.first_epoch_init) else None
    budget = resolve_budget(config, manifest, costs, su_mask)
    if not resume:
        run.create(_settings(config, manifest, data, budget))
    state, arrays = run.load_state()
    checkpoint = run.path / state.checkpoint if state.checkpoint else None  # resume from the last finished epoch
    session = TrainingSession(config.artifacts, checkpoint, threads=config.threads)
    return _Loop(config, manifest, data, session, run, costs, budget, su_mask, progress).run(state, arrays)


def _load_data(config: TrainConfig, manifest: Manifest) -> _Data:
    resolution = manifest.input.shape[2]
    dataset: Dataset = load_dataset(config.data, resolution)
    if config.classes:
        dataset = select_classes(dataset, config.classes)
    if dataset.num_classes != manifest.num_classes:
        raise NeqError(
            f"{dataset.name} has {dataset.num_classes} classes but the model's head has {manifest.num_classes}; "
            f"re-run `onnx-neq prepare MODEL.onnx --num-classes {dataset.num_classes}`"
        )
    pool = dataset.train
    if config.train_limit and config.train_limit < len(pool):
        pool = split_validation(pool, config.train_limit / len(pool), seed=0)[1]  # the same subset for every seed
    train_split, val = split_validation(pool, config.val_fraction, config.seed)
    if len(val) < 1 or len(train_split) < config.batch_size:
        raise NeqError(
            f"{dataset.name}: too few training images ({len(dataset.train)}) for a validation split and a batch of {config.batch_size}"
        )
    rng = np.random.default_rng([config.seed, 3])
    chosen = rng.choice(len(val), size=min(config.velocity_images, len(val)), replace=False)
    velocity_set = _prep(manifest, val.images[np.sort(chosen)])
    return _Data(train_split, val, dataset.test, velocity_set, dataset.num_classes)


def _prep(manifest: Manifest, images: np.ndarray) -> np.ndarray:
    spec = manifest.input
    return preprocess(images, spec.shape[2], spec.shape[1], spec.mean, spec.std)


def _su_mask(config: TrainConfig, manifest: Manifest) -> np.ndarray:
    """Static: from the pretrained weights in the artifacts' checkpoint, also when resuming."""
    scheme = load_su_scheme(config.su_scheme, manifest, config.budget, config.budget_ratio)
    weights = checkpoint_parameters(Path(config.artifacts) / manifest.files["checkpoint"], [layer.weight for layer in manifest.layers])
    norms = [np.linalg.norm(weights[layer.weight].reshape(layer.out_channels, -1), axis=1) for layer in manifest.layers]
    return select_su(norms, scheme)


def _settings(config: TrainConfig, manifest: Manifest, data: _Data, budget: Budget) -> dict:
    return {
        "config": asdict(config),
        "budget": asdict(budget),
        "model": {"source": manifest.source_model, "neurons": manifest.neurons, "selectable_params": manifest.selectable_params},
        "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test), "classes": data.num_classes},
        "onnx_neq_version": __import__("onnx_neq").__version__,
    }


class _Loop:
    def __init__(self, config, manifest, data, session, run, costs, budget, su_mask, progress):
        self.c, self.m, self.d, self.s, self.run_dir = config, manifest, data, session, run
        self.costs, self.budget, self.su_mask, self.progress = costs, budget, su_mask, progress
        self.sizes = [layer.out_channels for layer in manifest.layers]
        self.names = [layer.name for layer in manifest.layers]
        self.steps_per_epoch = len(self._batches(0))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = self.steps_per_epoch * min(config.warmup_epochs, config.epochs - 1)

    def run(self, state: RunState, arrays: dict[str, np.ndarray]) -> TrainResult:
        velocity = self._velocity_state(arrays)
        if state.checkpoint:
            self.progress("resume", {"epoch": state.epoch + 1})
        self.run_dir.truncate_metrics(state.epoch)
        taps = self._taps()  # epoch -1 (pretrained), or the end of the last finished epoch
        for epoch in range(state.epoch + 1, self.c.epochs):
            taps, state = self._epoch(epoch, taps, velocity, state)
        self._export_best(state)
        rows = self.run_dir.metrics()
        test = float(rows[state.best_epoch]["test_top1"]) if rows else float("nan")
        return TrainResult(self.run_dir.path, rows, state.best_epoch, state.best_val, test, self.budget, self.budget.warnings)

    def _velocity_state(self, arrays) -> VelocityState:
        if arrays:
            return VelocityState.from_arrays(arrays, self.c.mu, self.c.recurrence)
        return VelocityState(int(self.costs.size), self.c.mu, self.c.recurrence)

    # one epoch -----------------------------------------------------------------------------
    def _epoch(self, epoch: int, taps, velocity: VelocityState, state: RunState):
        start = time.perf_counter()
        selected = self._select(epoch, velocity)
        selection = time.perf_counter() - start
        masks = dict(zip(self.names, split_by_layer(selected, self.sizes)))
        self.s.set_masks(masks)
        loss, top1, lr = self._train_epoch(epoch)
        val, test = self._top1(self.d.val), self._top1(self.d.test)
        tap_start = time.perf_counter()
        new_taps = self._taps()
        velocity.update(layer_phi(new_taps, taps, self.names))
        selection += time.perf_counter() - tap_start
        row = {
            "epoch": epoch,
            "lr": f"{lr:.6g}",
            "train_loss": f"{loss:.5f}",
            "train_top1": f"{top1:.4f}",
            "val_top1": f"{val:.4f}",
            "test_top1": f"{test:.4f}",
            "updated_params": int(self.costs[selected].sum()),
            "budget": self.budget.params,
            "selected_neurons": int(selected.sum()),
            "epoch_seconds": f"{time.perf_counter() - start:.3f}",
            "selection_seconds": f"{selection:.3f}",
        }
        state = self._commit(epoch, row, masks, velocity, state, val)
        self.progress("epoch", row)
        return new_taps, state

    def _select(self, epoch: int, velocity: VelocityState) -> np.ndarray:
        kind = self.c.selector if epoch > 0 or self.c.selector in ("random", "su", "full") else self.c.first_epoch_init
        rng = np.random.default_rng([self.c.seed, epoch, 1])
        if kind == "velocity":
            return select_velocity(velocity.velocity, self.costs, self.budget.params, self.c.backfill)
        if kind == "random":
            return select_random(self.costs, self.budget.params, rng, self.c.backfill)
        if kind == "su":
            return self.su_mask.copy()
        if kind == "neq":
            return select_neq(velocity.velocity, self.c.eps)
        return select_full(self.costs)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.c.seed, epoch, 2]).permutation(len(self.d.train))
        batches = [order[i : i + self.c.batch_size] for i in range(0, len(order), self.c.batch_size)]
        return [b for b in batches if len(b) >= 2]  # a batch of one breaks batch-statistics BatchNorm

    def _train_epoch(self, epoch: int) -> tuple[float, float, float]:
        batches = self._batches(epoch)
        losses, correct, seen, lr = [], 0, 0, 0.0
        for i, idx in enumerate(batches):
            step = epoch * self.steps_per_epoch + i
            lr = learning_rate(step, self.total_steps, self.c.lr, self.warmup_steps)
            loss, logits = self.s.train_step(_prep(self.m, self.d.train.images[idx]), self.d.train.labels[idx], lr)
            losses.append(loss * len(idx))
            correct += int((logits.argmax(1) == self.d.train.labels[idx]).sum())
            seen += len(idx)
            self.progress("step", {"epoch": epoch, "epochs": self.c.epochs, "step": i + 1, "steps": len(batches), "loss": loss})
        return sum(losses) / seen, correct / seen, lr

    def _top1(self, split: Split) -> float:
        correct = 0
        for i in range(0, len(split), self.c.eval_batch_size):
            logits = self.s.eval_logits(_prep(self.m, split.images[i : i + self.c.eval_batch_size]))
            correct += int((logits.argmax(1) == split.labels[i : i + self.c.eval_batch_size]).sum())
        return correct / max(1, len(split))

    def _taps(self) -> dict[str, np.ndarray]:
        return self.s.eval_batch(self.d.velocity_set)[1]

    # persistence ----------------------------------------------------------------------------
    def _commit(self, epoch, row, masks, velocity, state: RunState, val: float) -> RunState:
        ckpt = self.run_dir.checkpoint_path(epoch)
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        self.s.save_checkpoint(tmp)
        os.replace(tmp, ckpt)
        self.run_dir.save_masks(epoch, masks)
        self.run_dir.save_velocity(epoch, velocity.phi, velocity.velocity)
        self.run_dir.append_metrics(row)
        rel = str(ckpt.relative_to(self.run_dir.path))
        better = val > state.best_val
        state = RunState(
            epoch, epoch if better else state.best_epoch, max(val, state.best_val), rel, rel if better else state.best_checkpoint
        )
        self.run_dir.commit(state, velocity.to_arrays())
        return state

    def _export_best(self, state: RunState) -> None:
        if state.best_checkpoint is None:
            return
        best = TrainingSession(self.c.artifacts, self.run_dir.path / state.best_checkpoint, threads=self.c.threads)
        tmp = self.run_dir.path / ".model.onnx.tmp"
        best.export_inference(tmp)
        record_normalization(tmp, self.m.input.mean, self.m.input.std)
        os.replace(tmp, self.run_dir.path / "model.onnx")
