"""`onnx-neq train`: budgeted fine-tuning on ONNX Runtime, masks chosen between epochs.

per epoch:  masks = selector(statistics, cost model, budget)  ->  SGD/AdamW steps with the masks as inputs
            ->  val/test top-1  ->  taps of the velocity set  ->  phi  ->  velocity  ->  checkpoint
Imports no torch: the ORT side goes through ort_runtime, the selectors are numpy.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from onnx_neq.backends.base import BACKENDS, default_backend, open_backend, read_parameters
from onnx_neq.data.datasets import Dataset, Split, load_dataset, preprocess, select_classes, split_validation
from onnx_neq.errors import DivergedError, NeqError, environment_error
from onnx_neq.manifest import Manifest, artifacts_fingerprint, read_manifest
from onnx_neq.selection.budget import AMOUNT_OPTIONS, Budget, requested_amount, resolve_budget
from onnx_neq.selection.cost_model import KINDS as COST_KINDS
from onnx_neq.selection.cost_model import CostModel, cost_model
from onnx_neq.selection.gradient import RunningNorm
from onnx_neq.selection.registry import FIRST_EPOCH_RULES, FISHER, GRADIENT_NORMS, RANK_COSTS, SELECTORS, WEIGHT_NORMS, SelectionInputs
from onnx_neq.selection.schemes import check_builtin_schemes, load_su_scheme
from onnx_neq.selection.selectors import SU_SCHEMES, select_su, split_by_layer
from onnx_neq.selection.velocity import PHI_MODES, RECURRENCES, VelocityState, layer_phi
from onnx_neq.training.default_model import artifacts_with_head, head_change
from onnx_neq.training.divergence import DivergenceGuard, non_finite
from onnx_neq.training.evaluate import record_normalization
from onnx_neq.training.run_dir import RunDir, RunState
from onnx_neq.training.run_lock import RunLock
from onnx_neq.training.schedule import learning_rate
from onnx_neq.typed_json import build

log = logging.getLogger(__name__)

GRADNORM_PREFIX = "gradnorm_"  # the running gradient norms, saved beside the velocity buffers
MAX_COUNT = 1 << 31  # no count of a run (epochs, batch, seed, images) comes near this


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
    memory_pattern: bool = False  # portable/specialized: ORT's memory pattern (up to 2x peak RSS, BENCHMARKS.md)
    eval_batch_size: int = 256
    budget_label: str | None = None  # how reports name this run's budget row (compare sets it)
    train_limit: int | None = None  # use a fixed stratified subset of this many training images
    backend: str | None = None  # ort-training | portable | specialized (default: ort-training where it is installed)
    bn_update: str | None = None  # always | selected (BatchNorm scale/bias train with their conv's channels; specialized only)
    cost: str | None = None  # params | compute | memory (default: params, or the unit of --compute-budget / --memory-budget)
    compute_budget: str | None = None  # backward MACs per image, e.g. "120M"
    memory_budget: str | None = None  # bytes of training memory, e.g. "256KB"
    phi: str = "spatial"  # spatial | flat
    rank_cost: str = "exact"  # exact | authors (a depthwise neuron ranked at groups x its cost)
    probe_batches: int = 2  # batches per epoch on which gradnorm / fisher measure every channel's gradient
    gradnorm_pool: int = 0  # gradnorm draws only from this many layers of largest gradient norm per parameter (0: all)

    def validate(self) -> None:
        """Every setting in range, new or read back from a run's settings.json (both are untrusted):
        NeqError naming the flag. Options that only some backends honour select such a backend."""
        self._validate_choices()
        self._validate_counts()
        self._validate_numbers()
        self._validate_cost()
        self._validate_backend()

    def _validate_choices(self) -> None:
        choices = (
            ("--selector", self.selector, SELECTORS),
            ("--phi", self.phi, PHI_MODES),
            ("--rank-cost", self.rank_cost, RANK_COSTS),
            ("--recurrence", self.recurrence, RECURRENCES),
            ("--backend", self.backend, (None, *BACKENDS)),
            ("--bn-update", self.bn_update, (None, "always", "selected")),
            ("--init", self.init, (None, *FIRST_EPOCH_RULES)),
        )
        for flag, value, allowed in choices:
            if value not in allowed:
                raise NeqError(f"{flag} must be one of {', '.join(c for c in allowed if c)}, not {value!r}")
        if self.classes is not None and (len(set(self.classes)) != len(self.classes) or len(self.classes) < 2 or min(self.classes) < 0):
            raise NeqError(f"--classes must name at least two different classes, not {self.classes}")

    def _validate_counts(self) -> None:
        minimums = {"epochs": 1, "batch_size": 2, "warmup_epochs": 0, "seed": 0, "velocity_images": 1, "threads": 0}
        minimums.update(eval_batch_size=1, probe_batches=1, gradnorm_pool=0, budget=0, train_limit=2)
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value is not None and not minimum <= value <= MAX_COUNT:
                raise NeqError(f"--{name.replace('_', '-')} must be an integer from {minimum} to {MAX_COUNT:,}, not {value}")

    def _validate_numbers(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise NeqError(f"--lr must be a finite number above 0, not {self.lr}")
        if not (math.isfinite(self.mu) and 0 <= self.mu <= 1):
            raise NeqError(f"--mu must be a number from 0 to 1, not {self.mu}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise NeqError(f"--eps must be a finite number of at least 0, not {self.eps}")
        if self.budget_ratio is not None and not (math.isfinite(self.budget_ratio) and self.budget_ratio > 0):
            raise NeqError(f"--budget-ratio must be a finite number above 0, not {self.budget_ratio}")
        if not (math.isfinite(self.val_fraction) and 0 < self.val_fraction < 1):
            raise NeqError("the validation fraction must lie strictly between 0 and 1")

    def _validate_backend(self) -> None:
        """--bn-update selected needs the specialised backend and --memory-pattern a portable one: given
        without --backend they select it; with a backend that ignores them they are refused."""
        wants = {"--bn-update selected": ("specialized",)} if self.bn_update == "selected" else {}
        wants.update({"--memory-pattern": ("portable", "specialized")} if self.memory_pattern else {})
        for flag, backends in wants.items():
            if self.backend is None:
                self.backend = backends[0]
            elif self.backend not in backends:
                raise NeqError(f"{flag} needs --backend {' or '.join(backends)}; --backend {self.backend} ignores it")
        self.bn_update = self.bn_update or "always"

    def _validate_cost(self) -> None:
        """--cost and the budget options agree on one unit; compute and memory imply --bn-update selected
        and the specialised backend (the masked ones run the whole backward pass whatever is selected)."""
        if self.cost is not None and self.cost not in COST_KINDS:
            raise NeqError(f"--cost must be one of {', '.join(COST_KINDS)}, not {self.cost!r}")
        kind = self.cost_kind
        for option in AMOUNT_OPTIONS.values():
            if getattr(self, option) is not None and option != AMOUNT_OPTIONS[kind]:
                raise NeqError(
                    f"--{option.replace('_', '-')} is a budget in another unit than --cost {kind}; give --{AMOUNT_OPTIONS[kind].replace('_', '-')} or --budget-ratio"
                )
        if kind != "params":
            if self.bn_update == "always":
                raise NeqError(f"--cost {kind} trains a channel's BatchNorm with it (--bn-update selected); drop --bn-update always")
            if self.backend not in (None, "specialized"):
                raise NeqError(f"--cost {kind} needs --backend specialized: the masked backends compute the whole backward pass")
            self.bn_update, self.backend = "selected", "specialized"

    @property
    def cost_kind(self) -> str:
        """--cost, or the unit of the budget option given (--compute-budget, --memory-budget), or params."""
        if self.cost is not None:
            return self.cost
        return next((kind for kind, option in AMOUNT_OPTIONS.items() if kind != "params" and getattr(self, option) is not None), "params")

    @property
    def first_epoch_init(self) -> str:
        return self.init or SELECTORS[self.selector].first_epoch or "random"


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


def train(config: TrainConfig, resume: bool = False, progress: Progress | None = None, overrides: dict | None = None) -> TrainResult:
    """Run (or resume) a fine-tuning run into config.out; see TrainConfig for the settings.

    `overrides`: the options given explicitly with --resume; only --epochs (and --threads) may differ
    from the run's stored settings (see _apply_overrides)."""
    progress = progress or (lambda event, info: None)
    run = RunDir(config.out)
    if resume:
        with RunLock(_existing(run)):
            return _guarded(run, lambda: _resume(run, config, overrides or {}, progress))
    config.validate()
    config.artifacts = str(Path(config.artifacts).resolve())
    config.backend = config.backend or default_backend(config.artifacts)
    manifest = read_manifest(config.artifacts)
    dataset = load_run_dataset(config, manifest)
    head_note = []
    if dataset.num_classes != manifest.num_classes:
        config.artifacts, head_note = str(artifacts_with_head(config.artifacts, dataset.num_classes)), [head_change(manifest, dataset)]
        manifest = read_manifest(config.artifacts)
    data = _load_data(config, manifest, dataset)
    models, su_mask, budget = _budget(config, manifest)
    if not run.exists():
        run.check_new()  # before creating anything; an existing run is reported after the lock (it may be in use)
    created = not run.path.exists()
    _make_dir(run.path)
    try:
        with RunLock(run.path):
            run.check_new()  # another process may have started a run here meanwhile
            settings = _settings(config, manifest, data, budget)
            return _guarded(run, lambda: _start(run, settings, config, manifest, data, models, budget, su_mask, progress, head_note))
    finally:
        if created:
            run.remove_if_unused()


def _start(run, settings, config, manifest, data, models, budget, su_mask, progress, notes: list[str]) -> TrainResult:
    """A new run: the backend opens before anything is written, and a run that fails before it commits
    its first epoch (bad artifacts, a divergence in epoch 0) leaves nothing that blocks the same --out."""
    session = open_backend(config.backend, config.artifacts, None, threads=config.threads, **_backend_options(config))
    run.create(settings)
    progress("start", _start_info(config, manifest, data, budget, notes))
    try:
        return _Loop(config, manifest, data, session, run, models, budget, su_mask, progress).run(RunState(), {})
    except Exception:
        if not run.committed():
            run.discard()
        raise


def _resume(run: RunDir, requested: TrainConfig, overrides: dict, progress: Progress) -> TrainResult:
    """Continue the run in `run` with its stored settings, checked as strictly as new ones; nothing is
    written to the run until every check has passed."""
    settings = run.settings()
    config = _stored_config(run, settings)
    stored_epochs = config.epochs
    notes = _apply_overrides(run, config, overrides)
    config.validate()
    manifest = read_manifest(config.artifacts)
    _check_fingerprint(run, settings, config)
    data = _load_data(config, manifest)
    models, su_mask, budget = _budget(config, manifest)
    state, arrays, damage = run.resume_point(lambda path: _checkpoint_problem(config, manifest, path))
    checkpoint = run.path / state.checkpoint if state.checkpoint else None
    session = open_backend(config.backend, config.artifacts, checkpoint, threads=config.threads, **_backend_options(config))
    if config.epochs != stored_epochs:
        run.write_settings({**settings, "config": asdict(config)})
    progress("start", _start_info(config, manifest, data, budget, notes + damage, resumed_at=state.epoch + 1))
    return _Loop(config, manifest, data, session, run, models, budget, su_mask, progress).run(state, arrays)


def _guarded(run: RunDir, body: Callable[[], TrainResult]) -> TrainResult:
    """Environment failures (disk full, read-only, permissions) as one line with the way to continue."""
    try:
        return body()
    except OSError as exc:
        hint = (
            f"fix that, then continue with: onnx-neq train --out {run.path} --resume"
            if run.exists()
            else "choose another --out or fix its permissions"
        )
        raise environment_error(exc, "write" if not isinstance(exc, FileNotFoundError) else "read", hint) from None


def _existing(run: RunDir) -> Path:
    run.settings()  # a clear error when there is no run to resume
    return run.path


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise environment_error(exc, "create", "choose another --out") from None


def _backend_options(config: TrainConfig) -> dict:
    options = {"memory_pattern": True} if config.memory_pattern and config.backend in ("portable", "specialized") else {}
    return {**options, "bn_update": config.bn_update} if config.backend == "specialized" else options


def _budget(config: TrainConfig, manifest: Manifest) -> tuple[dict[str, CostModel], np.ndarray | None, Budget]:
    """The cost models (each that the model's shapes allow; the run's own must work), the Sparse Update
    mask where a selector needs it, and the budget in the unit of the run's cost model."""
    models = {}
    for kind in COST_KINDS:
        try:
            models[kind] = cost_model(kind, manifest, config.bn_update, config.batch_size)
        except NeqError:
            if kind == config.cost_kind:
                raise
    model = models[config.cost_kind]
    wanted = WEIGHT_NORMS in SELECTORS[config.selector].needs or config.first_epoch_init == "su"
    su_mask = _su_mask(config, manifest, model) if wanted else None
    return models, su_mask, resolve_budget(config, model, su_mask)


def _start_info(config, manifest: Manifest, data: _Data, budget: Budget, notes: list[str], resumed_at: int | None = None) -> dict:
    return {
        "artifacts": config.artifacts,
        "source_model": manifest.source_model,
        "layers": len(manifest.layers),
        "neurons": manifest.neurons,
        "num_classes": manifest.num_classes,
        "data": f"{config.data}{' classes ' + ','.join(map(str, config.classes)) if config.classes else ''}",
        "sizes": (len(data.train), len(data.val), len(data.test)),
        "budget": budget,
        "selector": config.selector,
        "backend": config.backend,
        "epochs": config.epochs,
        "notes": notes + budget.warnings,
        "resumed_at": resumed_at,
    }


# resume: what may change, and what must not ------------------------------------------------------
RESUMABLE_CHANGES = {"epochs", "threads", "memory_pattern"}


def _stored_config(run: RunDir, settings: dict) -> TrainConfig:
    """The run's TrainConfig from its settings.json, every field's type checked (ranges: validate())."""
    where, fix = run.path / "settings.json", "start a new run with another --out"
    if not isinstance(settings, dict) or not isinstance(settings.get("artifacts", {}), dict):
        raise NeqError(f"{where} does not hold the settings of an onnx-neq run; {fix}")
    config = build(TrainConfig, settings.get("config"), str(where), fix, root="config")
    config.out = str(run.path)
    config.backend = config.backend or "ort-training"  # runs from before the portable backend
    return config


def _apply_overrides(run: RunDir, config: TrainConfig, overrides: dict) -> list[str]:
    """--epochs extends (or shortens) the schedule explicitly; any other changed option is refused."""
    changed = {k: v for k, v in overrides.items() if k in asdict(config) and _differs(getattr(config, k), v)}
    refused = sorted(set(changed) - RESUMABLE_CHANGES)
    if refused:
        flags = ", ".join(f"--{k.replace('_', '-')} {changed[k]} (the run has {getattr(config, k)})" for k in refused)
        raise NeqError(
            f"--resume continues {run.path} with its stored settings, and only --epochs may change: {flags}; drop the flag, or start a new run with another --out"
        )
    notes = []
    if "epochs" in changed:
        done = run.load_state().epoch + 1
        if changed["epochs"] < max(done, 1):
            raise NeqError(f"--epochs {changed['epochs']} is fewer than the {done} epochs {run.path} has finished")
        notes.append(
            f"schedule changed from {config.epochs} to {changed['epochs']} epochs: the learning rate of epochs {done} on follows the new length"
        )
        config.epochs = changed["epochs"]
    config.threads = overrides.get("threads", config.threads)
    config.memory_pattern = overrides.get("memory_pattern", config.memory_pattern)
    return notes


def _differs(stored, given) -> bool:
    if isinstance(stored, float) or isinstance(given, float):
        return stored is None or given is None or float(stored) != float(given)
    return stored != given


def _check_fingerprint(run: RunDir, settings: dict, config: TrainConfig) -> None:
    """The artifact files the run read when it started (settings' artifacts.files: the manifest and what its
    backend reads; runs from before that list: every file of the manifest) must be there, unchanged."""
    recorded = settings.get("artifacts") if isinstance(settings.get("artifacts"), dict) else {}
    fingerprint, files = recorded.get("fingerprint"), recorded.get("files")
    if not fingerprint:
        return
    if files is not None and not (isinstance(files, list) and "manifest.json" in files and all(isinstance(n, str) for n in files)):
        raise NeqError(f"{run.path / 'settings.json'} lists the artifacts' files wrongly; start a new run with another --out")
    if artifacts_fingerprint(config.artifacts, files) != fingerprint:
        raise NeqError(
            f"the artifacts {config.artifacts} changed since {run.path} started (prepared again, or a file the run reads replaced"
            f"{': ' + ', '.join(files) if files else ''}); --resume needs the artifacts the run started with: start a new run with another --out"
        )


def _checkpoint_problem(config: TrainConfig, manifest: Manifest, path: Path) -> str | None:
    try:
        params = read_parameters(
            config.backend, path, [p for layer in manifest.layers for p in (layer.weight, layer.bias) if p] + manifest.always_trained
        )
    except Exception as exc:  # ORT reads a damaged checkpoint with a C++ error
        return f"cannot be read ({str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else exc.__class__.__name__})"
    bad = non_finite(params)
    return f"holds non-finite weights ({', '.join(bad[:3])})" if bad else None


def _load_data(config: TrainConfig, manifest: Manifest, dataset: Dataset | None = None) -> _Data:
    dataset = dataset or load_run_dataset(config, manifest)
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


def load_run_dataset(config: TrainConfig, manifest: Manifest) -> Dataset:
    dataset: Dataset = load_dataset(config.data, image_size(manifest))
    return select_classes(dataset, config.classes) if config.classes else dataset


def image_size(manifest: Manifest) -> tuple[int, int]:
    """The model's input (height, width): images are resized to both, so non-square models train."""
    return int(manifest.input.shape[2]), int(manifest.input.shape[3])


def _prep(manifest: Manifest, images: np.ndarray) -> np.ndarray:
    spec = manifest.input
    return preprocess(images, image_size(manifest), spec.shape[1], spec.mean, spec.std)


def _su_mask(config: TrainConfig, manifest: Manifest, model: CostModel) -> np.ndarray:
    """Static: from the pretrained weights in the artifacts' checkpoint, also when resuming. Without
    --su-scheme, the largest built-in scheme whose cost (in the run's unit) fits the budget."""
    weights = initial_parameters(config.artifacts, manifest, [layer.weight for layer in manifest.layers])
    norms = [np.linalg.norm(weights[layer.weight].reshape(layer.out_channels, -1), axis=1) for layer in manifest.layers]
    if config.su_scheme is not None or model.kind == "params":
        return select_su(norms, load_su_scheme(config.su_scheme, manifest, config.budget, config.budget_ratio))
    check_builtin_schemes(manifest)
    amount = requested_amount(config, model)
    masks = [select_su(norms, scheme) for scheme in SU_SCHEMES.values()]
    fitting = [mask for mask in masks if model.cost(mask) <= amount]
    if not fitting:
        raise NeqError(f"no built-in Sparse Update scheme fits the budget of {amount:,} {model.unit}; raise it or pass --su-scheme FILE")
    return max(fitting, key=model.cost)


def initial_parameters(artifacts: str | Path, manifest: Manifest, names: list[str]) -> dict[str, np.ndarray]:
    """Pretrained parameters from the artifacts (the portable .npz where prepare wrote one)."""
    if "parameters" in manifest.files and (Path(artifacts) / manifest.files["parameters"]).exists():
        return read_parameters("portable", Path(artifacts) / manifest.files["parameters"], names)
    return read_parameters("ort-training", Path(artifacts) / manifest.files["checkpoint"], names)


def _settings(config: TrainConfig, manifest: Manifest, data: _Data, budget: Budget) -> dict:
    """The run's settings; reads every artifact file the run needs (its fingerprint), so one that is missing
    or unreadable stops the run here, before its first epoch."""
    from onnx_neq.manifest import files_needed

    probe = ("portable_training_model",) if set(SELECTORS[config.selector].needs) & {GRADIENT_NORMS, FISHER} else ()
    files = files_needed(manifest, config.backend, probe)
    return {
        "config": asdict(config),
        "budget": asdict(budget),
        "artifacts": {"path": config.artifacts, "files": files, "fingerprint": artifacts_fingerprint(config.artifacts, files)},
        "model": {"source": manifest.source_model, "neurons": manifest.neurons, "selectable_params": manifest.selectable_params},
        "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test), "classes": data.num_classes},
        "onnx_neq_version": __import__("onnx_neq").__version__,
    }


class _Loop:
    def __init__(self, config, manifest, data, session, run, models, budget, su_mask, progress):
        self.c, self.m, self.d, self.s, self.run_dir = config, manifest, data, session, run
        self.models, self.budget, self.su_mask, self.progress = models, budget, su_mask, progress
        self.model = models[config.cost_kind]
        self.rank_costs = _rank_costs(self.model, manifest, config.rank_cost)
        self.statistics = set(SELECTORS[config.selector].needs)
        self.gradient_probe = _gradient_probe(config) if self.statistics & {GRADIENT_NORMS, FISHER} else None
        self.sizes = [layer.out_channels for layer in manifest.layers]
        self.names = [layer.name for layer in manifest.layers]
        self.steps_per_epoch = len(self._batches(0))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = self.steps_per_epoch * min(config.warmup_epochs, config.epochs - 1)

    def run(self, state: RunState, arrays: dict[str, np.ndarray]) -> TrainResult:
        velocity = self._velocity_state(arrays)
        saved = {k[len(GRADNORM_PREFIX) :]: v for k, v in arrays.items() if k.startswith(GRADNORM_PREFIX)}
        self.norms = RunningNorm.from_arrays(saved) if saved else RunningNorm(self.m.neurons)
        self.guard = DivergenceGuard(state.reference_loss, self.m.num_classes)
        self.run_dir.truncate_metrics(state.epoch)
        taps = self._taps()  # epoch -1 (pretrained), or the end of the last finished epoch
        try:
            for epoch in range(state.epoch + 1, self.c.epochs):
                taps, state = self._epoch(epoch, taps, velocity, state)
        except DivergedError as exc:
            raise DivergedError(f"{exc}; {self._kept(state)}; lower --lr (this run: {self.c.lr:g}) and start a new run") from None
        self._export_best(state)
        rows = self.run_dir.metrics()
        by_epoch = {int(r["epoch"]): r for r in rows}
        test = float(by_epoch[state.best_epoch]["test_top1"]) if state.best_epoch in by_epoch else float("nan")
        return TrainResult(self.run_dir.path, rows, state.best_epoch, state.best_val, test, self.budget, self.budget.warnings)

    def _kept(self, state: RunState) -> str:
        """After a divergence: what the run keeps (model.onnx from the best epoch before it)."""
        if state.epoch < 0:
            return "no epoch finished, so there is no model.onnx"
        self._export_best(state)
        return f"epochs 0-{state.epoch} are kept and model.onnx holds the best of them (epoch {state.best_epoch})"

    def _velocity_state(self, arrays) -> VelocityState:
        if arrays:
            return VelocityState.from_arrays(arrays, self.c.mu, self.c.recurrence)
        return VelocityState(self.m.neurons, self.c.mu, self.c.recurrence)

    # one epoch -----------------------------------------------------------------------------
    def _epoch(self, epoch: int, taps, velocity: VelocityState, state: RunState):
        start = time.perf_counter()
        fisher, probe_seconds = self._probe(epoch)
        selection_start = time.perf_counter()
        selected = self._select(epoch, velocity, fisher)
        self.norms.mark_trained(selected)
        selection = time.perf_counter() - selection_start
        masks = dict(zip(self.names, split_by_layer(selected, self.sizes)))
        specialize_before = getattr(self.s, "specialize_seconds", 0.0)
        self.s.set_masks(masks)
        specialize = getattr(self.s, "specialize_seconds", 0.0) - specialize_before
        loss, top1, lr, step_ms = self._train_epoch(epoch)
        self.guard.epoch(epoch, loss)
        DivergenceGuard.weights(epoch, self.s.parameters())
        val, test = self._top1(self.d.val), self._top1(self.d.test)
        tap_start = time.perf_counter()
        new_taps = self._taps()
        velocity.update(layer_phi(new_taps, taps, self.names, self.c.phi))
        selection += time.perf_counter() - tap_start
        params = self.models["params"].cost(selected)
        row = {
            "epoch": epoch,
            "lr": f"{lr:.6g}",
            "train_loss": f"{loss:.5f}",
            "train_top1": f"{top1:.4f}",
            "val_top1": f"{val:.4f}",
            "test_top1": f"{test:.4f}",
            "updated_params": params,
            "budget": self.budget.amount,
            "selected_neurons": int(selected.sum()),
            "epoch_seconds": f"{time.perf_counter() - start:.3f}",
            "selection_seconds": f"{selection:.3f}",
            "step_ms": f"{step_ms:.2f}",
            "update_bytes": self.s.update_bytes(),
            "backward_macs": self.s.backward_macs(),
            "specialize_seconds": f"{specialize:.3f}",
            "cost_params": params,  # updated_params, beside its two siblings
            "cost_macs": self.models["compute"].cost(selected) if "compute" in self.models else "",
            "cost_bytes": self.models["memory"].cost(selected) if "memory" in self.models else "",
            "probe_seconds": f"{probe_seconds:.3f}",
        }
        state = self._commit(epoch, row, masks, velocity, state, val)
        self.progress("epoch", row)
        return new_taps, state

    def _probe(self, epoch: int) -> tuple[np.ndarray | None, float]:
        """Every channel's gradient statistics on --probe-batches training batches, with the current weights:
        Fisher potentials from epoch 0 (the pretrained model), running gradient norms from epoch 1 (they
        follow training; their selector draws uniformly first)."""
        if not (FISHER in self.statistics or (GRADIENT_NORMS in self.statistics and epoch > 0)):
            return None, 0.0
        start = time.perf_counter()
        order = np.random.default_rng([self.c.seed, epoch, 4]).permutation(len(self.d.train))
        chunks = [order[i * self.c.batch_size : (i + 1) * self.c.batch_size] for i in range(self.c.probe_batches)]
        batches = [(_prep(self.m, self.d.train.images[b]), self.d.train.labels[b]) for b in chunks if len(b) >= 2]
        stats = self.gradient_probe.measure_batches(self.s.parameters(), batches)
        self.norms.update(stats.grad_norm)
        return stats.fisher, time.perf_counter() - start

    def _select(self, epoch: int, velocity: VelocityState, fisher: np.ndarray | None = None) -> np.ndarray:
        spec = SELECTORS[self.c.selector]
        if epoch == 0 and spec.first_epoch is not None:
            spec = SELECTORS[self.c.first_epoch_init]
        inputs = SelectionInputs(
            epoch,
            self.model,
            self.budget.amount,
            self.rank_costs,
            np.random.default_rng([self.c.seed, epoch, 1]),
            self.c.backfill,
            self.sizes,
            velocity=velocity.velocity,
            su_mask=self.su_mask,
            gradient_norms=self.norms.norm,
            trained_ever=self.norms.trained_ever,
            fisher=fisher,
            options={option: getattr(self.c, option) for option in spec.options},
        )
        return spec.select(inputs)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.c.seed, epoch, 2]).permutation(len(self.d.train))
        batches = [order[i : i + self.c.batch_size] for i in range(0, len(order), self.c.batch_size)]
        return [b for b in batches if len(b) >= 2]  # a batch of one breaks batch-statistics BatchNorm

    def _train_epoch(self, epoch: int) -> tuple[float, float, float, float]:
        batches = self._batches(epoch)
        losses, correct, seen, lr, stepping = [], 0, 0, 0.0, 0.0
        for i, idx in enumerate(batches):
            step = epoch * self.steps_per_epoch + i
            lr = learning_rate(step, self.total_steps, self.c.lr, self.warmup_steps)
            images = _prep(self.m, self.d.train.images[idx])
            start = time.perf_counter()
            loss, logits = self.s.train_step(images, self.d.train.labels[idx], lr)
            stepping += time.perf_counter() - start
            self.guard.step(epoch, i, loss)
            losses.append(loss * len(idx))
            correct += int((logits.argmax(1) == self.d.train.labels[idx]).sum())
            seen += len(idx)
            self.progress("step", {"epoch": epoch, "epochs": self.c.epochs, "step": i + 1, "steps": len(batches), "loss": loss})
        return sum(losses) / seen, correct / seen, lr, 1000 * stepping / max(1, len(batches))

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
        """Checkpoint, masks, velocity and metrics of the epoch, then the commit point (run_state.json)."""
        checkpoint = self.run_dir.write_checkpoint(epoch, self.s.save_checkpoint)
        self.run_dir.save_masks(epoch, masks)
        self.run_dir.save_velocity(epoch, velocity.phi, velocity.velocity)
        self.run_dir.append_metrics(row)
        better = val > state.best_val
        state = RunState(epoch, epoch if better else state.best_epoch, max(val, state.best_val), self.guard.reference, state.checkpoints)
        arrays = {**velocity.to_arrays(), **{GRADNORM_PREFIX + k: v for k, v in self.norms.to_arrays().items()}}
        return self.run_dir.commit(state, checkpoint, arrays)

    def _export_best(self, state: RunState) -> None:
        if state.best_checkpoint is None:
            return
        best = open_backend(
            self.c.backend, self.c.artifacts, self.run_dir.path / state.best_checkpoint, threads=self.c.threads, **_backend_options(self.c)
        )
        tmp = self.run_dir.path / ".model.onnx.tmp"
        try:
            best.export_inference(tmp)
            record_normalization(tmp, self.m.input.mean, self.m.input.std)
            os.replace(tmp, self.run_dir.path / "model.onnx")
        finally:
            tmp.unlink(missing_ok=True)


def _rank_costs(model: CostModel, manifest: Manifest, rank_cost: str) -> np.ndarray:
    """What a neuron's |statistic| is divided by in rankings: its cost in the run's unit; with --rank-cost
    authors a depthwise neuron counts `groups` times (C_in * kh * kw weights, as the authors' code ranks it)."""
    if rank_cost == "exact":
        return model.per_neuron.astype(np.float64)
    factor = np.repeat(
        [layer.groups if layer.kind == "depthwise" else 1 for layer in manifest.layers], [layer.out_channels for layer in manifest.layers]
    )
    return model.per_neuron * factor.astype(np.float64)


def _gradient_probe(config: TrainConfig):
    from onnx_neq.training.gradient_stats import GradientProbe

    return GradientProbe(config.artifacts, threads=config.threads)
