"""What a run needs before its first epoch: its data (splits, velocity set), its cost models, budget and
Sparse Update mask, the settings it records, and the lines it prints at the start."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from onnx_neq.backends.base import ORT_TRAINING, PORTABLE, backend_files, read_parameters
from onnx_neq.data.datasets import Dataset, Split, load_dataset, preprocess, select_classes, split_validation
from onnx_neq.data.shards import parse_shard
from onnx_neq.errors import NeqError
from onnx_neq.manifest import Manifest, artifacts_fingerprint
from onnx_neq.selection.budget import Budget, requested_amount, resolve_budget
from onnx_neq.selection.cost_model import KINDS as COST_KINDS
from onnx_neq.selection.cost_model import CostModel, cost_model
from onnx_neq.selection.registry import PROBED, SELECTORS, SU, Needs
from onnx_neq.selection.schemes import su_selection
from onnx_neq.training.config import TrainConfig


@dataclass
class RunData:
    train: Split
    val: Split
    test: Split
    velocity_set: np.ndarray  # preprocessed validation images whose conv outputs the velocity compares
    num_classes: int


@dataclass
class Selection:
    """The cost models (each that the model's shapes allow; the run's own always), the Sparse Update mask
    where the selector needs it, and the budget in the unit of the run's cost model."""

    models: dict[str, CostModel]
    su_mask: np.ndarray | None
    budget: Budget


def load_data(config: TrainConfig, manifest: Manifest, dataset: Dataset | None = None) -> RunData:
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
    velocity_set = prep(manifest, val.images[np.sort(chosen)])
    return RunData(train_split, val, dataset.test, velocity_set, dataset.num_classes)


def load_run_dataset(config: TrainConfig, manifest: Manifest) -> Dataset:
    dataset: Dataset = load_dataset(config.data, image_size(manifest))
    dataset = select_classes(dataset, config.classes) if config.classes else dataset
    if config.shard is None:
        return dataset
    shard = parse_shard(config.shard)
    part = dataset.train.take(shard.indices(dataset.train.labels))
    return Dataset(f"{dataset.name} client {shard.client} of {shard.clients} ({shard.split})", part, dataset.test, dataset.num_classes)


def image_size(manifest: Manifest) -> tuple[int, int]:
    """The model's input (height, width): images are resized to both, so non-square models train."""
    return int(manifest.input.shape[2]), int(manifest.input.shape[3])


def prep(manifest: Manifest, images: np.ndarray) -> np.ndarray:
    """Images (N, H, W, C) uint8 as the model takes them: resized, normalised, NCHW float32."""
    spec = manifest.input
    return preprocess(images, image_size(manifest), spec.shape[1], spec.mean, spec.std)


def selection_setup(config: TrainConfig, manifest: Manifest) -> Selection:
    models = {}
    for kind in COST_KINDS:
        try:
            models[kind] = cost_model(kind, manifest, config.bn_update, config.batch_size)
        except NeqError:
            if kind == config.cost_kind:
                raise
    model = models[config.cost_kind]
    wanted = Needs.WEIGHT_NORMS in SELECTORS[config.selector].needs or config.first_epoch_init == SU
    su_mask = sparse_update_mask(config, manifest, model) if wanted else None
    return Selection(models, su_mask, resolve_budget(config.budget_request(), model, su_mask))


def sparse_update_mask(config: TrainConfig, manifest: Manifest, model: CostModel) -> np.ndarray:
    """Static: from the pretrained weights in the artifacts' checkpoint, also when resuming. Without
    --su-scheme, the largest built-in scheme whose cost (in the run's unit) fits the budget asked for."""
    weights = initial_parameters(config.artifacts, manifest, [layer.weight for layer in manifest.layers])
    norms = [np.linalg.norm(weights[layer.weight].reshape(layer.out_channels, -1), axis=1) for layer in manifest.layers]
    amount = requested_amount(config.budget_request(), model) if config.su_scheme is None else None
    return su_selection(config.su_scheme, manifest, norms, model, amount)


def initial_parameters(artifacts: str | Path, manifest: Manifest, names: list[str]) -> dict[str, np.ndarray]:
    """Pretrained parameters from the artifacts (the portable .npz where prepare wrote one)."""
    if "parameters" in manifest.files and (Path(artifacts) / manifest.files["parameters"]).exists():
        return read_parameters(PORTABLE, Path(artifacts) / manifest.files["parameters"], names)
    return read_parameters(ORT_TRAINING, Path(artifacts) / manifest.files["checkpoint"], names)


def run_settings(config: TrainConfig, manifest: Manifest, data: RunData, budget: Budget) -> dict:
    """The run's settings; reads every artifact file the run needs (its fingerprint), so one that is missing
    or unreadable stops the run here, before its first epoch."""
    probe = ("portable_training_model",) if set(SELECTORS[config.selector].needs) & PROBED else ()
    files = backend_files(config.backend, manifest, probe)
    return {
        "config": asdict(config),
        "budget": asdict(budget),
        "artifacts": {"path": config.artifacts, "files": files, "fingerprint": artifacts_fingerprint(config.artifacts, files)},
        "model": {"source": manifest.source_model, "neurons": manifest.neurons, "selectable_params": manifest.selectable_params},
        "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test), "classes": data.num_classes},
        "onnx_neq_version": __import__("onnx_neq").__version__,
    }


def start_info(
    config: TrainConfig, manifest: Manifest, data: RunData, budget: Budget, notes: list[str], resumed_at: int | None = None
) -> dict:
    """What the CLI prints before the first epoch (the "start" progress event)."""
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
