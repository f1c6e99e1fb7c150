"""`onnx-neq train`: budgeted fine-tuning on ONNX Runtime, masks chosen between epochs.

train(config) starts (or resumes) a run: settings checked (config.py), data and budget set up (setup.py),
the run directory created and locked, the backend opened, then the TrainingLoop (loop.py) runs the epochs
with the SelectorPolicy (selector_policy.py). Imports no torch: the ORT side goes through ort_runtime,
the selectors are numpy.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onnx_neq.backends.base import default_backend, open_backend
from onnx_neq.errors import environment_error
from onnx_neq.manifest import Manifest, read_manifest
from onnx_neq.selection.budget import Budget
from onnx_neq.selection.registry import SELECTORS
from onnx_neq.training.config import TrainConfig
from onnx_neq.training.default_model import artifacts_with_head, head_change
from onnx_neq.training.loop import LoopResult, Policy, Progress, TrainingLoop
from onnx_neq.training.resume import apply_overrides, check_fingerprint, checkpoint_problem, stored_config
from onnx_neq.training.run_dir import RunDir, RunState
from onnx_neq.training.run_lock import RunLock
from onnx_neq.training.selector_policy import SelectorPolicy
from onnx_neq.training.setup import RunData, Selection, load_data, load_run_dataset, run_settings, selection_setup, start_info

__all__ = ["PolicyFactory", "Progress", "TrainConfig", "TrainResult", "train"]

log = logging.getLogger(__name__)

PolicyFactory = Callable[[TrainConfig, Manifest, Selection], Policy]  # SelectorPolicy is one


@dataclass
class TrainResult:
    run_dir: Path
    rows: list[dict]
    best_epoch: int
    best_val: float
    test_at_best_val: float
    budget: Budget
    warnings: list[str] = field(default_factory=list)


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: Progress | None = None,
    overrides: dict | None = None,
    policy: PolicyFactory | None = None,
) -> TrainResult:
    """Run (or resume) a fine-tuning run into config.out; see TrainConfig for the settings.

    `overrides`: the options given explicitly with --resume; only --epochs (and --threads) may differ
    from the run's stored settings (see resume.apply_overrides). `policy(config, manifest, selection)`
    makes what the loop trains (loop.Policy), once the backend is open; by default the selector's (policy_for)."""
    progress = progress or (lambda event, info: None)
    run = RunDir(config.out)
    if resume:
        with RunLock(_existing(run)):
            return _guarded(run, lambda: _resume(run, config, overrides or {}, progress, policy))
    config.validate()
    config.artifacts = str(Path(config.artifacts).resolve())
    config.backend = config.backend or default_backend(config.artifacts)
    manifest = read_manifest(config.artifacts)
    dataset = load_run_dataset(config, manifest)
    head_note = []
    if dataset.num_classes != manifest.num_classes:
        config.artifacts, head_note = str(artifacts_with_head(config.artifacts, dataset.num_classes)), [head_change(manifest, dataset)]
        manifest = read_manifest(config.artifacts)
    data = load_data(config, manifest, dataset)
    selection = selection_setup(config, manifest)
    if not run.exists():
        run.check_new()  # before creating anything; an existing run is reported after the lock (it may be in use)
    created = not run.path.exists()
    _make_dir(run.path)
    try:
        with RunLock(run.path):
            run.check_new()  # another process may have started a run here meanwhile
            settings = run_settings(config, manifest, data, selection.budget)
            start = _Start(config, manifest, data, selection, progress, head_note, policy)
            return _guarded(run, lambda: _start(run, settings, start))
    finally:
        if created:
            run.remove_if_unused()


@dataclass
class _Start:
    """What a new run has settled before its directory is written."""

    config: TrainConfig
    manifest: Manifest
    data: RunData
    selection: Selection
    progress: Progress
    notes: list[str]
    policy: PolicyFactory | None


def _start(run: RunDir, settings: dict, s: _Start) -> TrainResult:
    """A new run: the backend opens before anything is written, and a run that fails before it commits
    its first epoch (bad artifacts, a divergence in epoch 0) leaves nothing that blocks the same --out."""
    config = s.config
    session = open_backend(config.backend, config.artifacts, config.initial_weights, threads=config.threads, **config.backend_options())
    run.create(settings)
    s.progress("start", start_info(config, s.manifest, s.data, s.selection.budget, s.notes))
    try:
        make = s.policy or policy_for(config)
        loop = TrainingLoop(config, s.manifest, s.data, session, run, make(config, s.manifest, s.selection), s.progress)
        return _result(loop.run(RunState(), {}), s.selection.budget)
    except Exception:
        if not run.committed():
            run.discard()
        raise


def _resume(run: RunDir, requested: TrainConfig, overrides: dict, progress: Progress, policy: PolicyFactory | None) -> TrainResult:
    """Continue the run in `run` with its stored settings, checked as strictly as new ones; nothing is
    written to the run until every check has passed."""
    settings = run.settings()
    config = stored_config(run, settings)
    stored_epochs = config.epochs
    notes = apply_overrides(run, config, overrides)
    config.validate()
    manifest = read_manifest(config.artifacts)
    check_fingerprint(run, settings, config)
    data = load_data(config, manifest)
    selection = selection_setup(config, manifest)
    state, saved, damage = run.resume_point(lambda path: checkpoint_problem(config, manifest, path))
    checkpoint = run.path / state.checkpoint if state.checkpoint else config.initial_weights  # no epoch yet: where it started
    session = open_backend(config.backend, config.artifacts, checkpoint, threads=config.threads, **config.backend_options())
    if config.epochs != stored_epochs:
        run.write_settings({**settings, "config": asdict(config)})
    progress("start", start_info(config, manifest, data, selection.budget, notes + damage, resumed_at=state.epoch + 1))
    make = policy or policy_for(config)
    loop = TrainingLoop(config, manifest, data, session, run, make(config, manifest, selection), progress)
    return _result(loop.run(state, saved), selection.budget)


def policy_for(config: TrainConfig) -> PolicyFactory:
    """The loop policy of config's selector: its registry entry's `policy` ("module:Class"), else SelectorPolicy."""
    spec = SELECTORS[config.selector].policy
    if spec is None:
        return SelectorPolicy
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _result(result: LoopResult, budget: Budget) -> TrainResult:
    return TrainResult(result.run_dir, result.rows, result.best_epoch, result.best_val, result.test_at_best_val, budget, budget.warnings)


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
