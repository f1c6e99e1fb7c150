"""--resume: what a run continues from (its settings.json, checked like new settings), what may change
(RESUMABLE_CHANGES) and what must not (the artifacts' fingerprint, a damaged checkpoint)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from onnx_neq.backends.base import ORT_TRAINING, read_parameters
from onnx_neq.errors import NeqError
from onnx_neq.manifest import Manifest, artifacts_fingerprint
from onnx_neq.training.config import BY_NAME, TrainConfig
from onnx_neq.training.divergence import non_finite
from onnx_neq.training.run_dir import RunDir
from onnx_neq.typed_json import build

RESUMABLE_CHANGES = {"epochs", "threads", "memory_pattern"}


def stored_config(run: RunDir, settings: dict) -> TrainConfig:
    """The run's TrainConfig from its settings.json, every field's type checked (ranges: validate())."""
    where, fix = run.path / "settings.json", "start a new run with another --out"
    if not isinstance(settings, dict) or not isinstance(settings.get("artifacts", {}), dict):
        raise NeqError(f"{where} does not hold the settings of an onnx-neq run; {fix}")
    config = build(TrainConfig, settings.get("config"), str(where), fix, root="config")
    config.out = str(run.path)
    config.backend = config.backend or ORT_TRAINING  # runs from before the portable backend
    return config


def apply_overrides(run: RunDir, config: TrainConfig, overrides: dict) -> list[str]:
    """--epochs extends (or shortens) the schedule explicitly; any other changed option is refused."""
    changed = {k: v for k, v in overrides.items() if k in asdict(config) and _differs(getattr(config, k), v)}
    refused = sorted(set(changed) - RESUMABLE_CHANGES)
    if refused:
        flags = ", ".join(f"{BY_NAME[k].flag} {changed[k]} (the run has {getattr(config, k)})" for k in refused)
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
    for name in sorted(RESUMABLE_CHANGES - {"epochs"}):  # epochs: checked above
        setattr(config, name, overrides.get(name, getattr(config, name)))
    return notes


def _differs(stored, given) -> bool:
    if isinstance(stored, float) or isinstance(given, float):
        return stored is None or given is None or float(stored) != float(given)
    return stored != given


def check_fingerprint(run: RunDir, settings: dict, config: TrainConfig) -> None:
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


def checkpoint_problem(config: TrainConfig, manifest: Manifest, path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (unreadable, non-finite weights), or None."""
    try:
        params = read_parameters(
            config.backend, path, [p for layer in manifest.layers for p in (layer.weight, layer.bias) if p] + manifest.always_trained
        )
    except Exception as exc:  # ORT reads a damaged checkpoint with a C++ error
        return f"cannot be read ({str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else exc.__class__.__name__})"
    bad = non_finite(params)
    return f"holds non-finite weights ({', '.join(bad[:3])})" if bad else None
