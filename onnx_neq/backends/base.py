"""The one interface train, eval, compare and the benchmarks use to run a training graph.

    backend = open_backend(name, artifacts_dir, checkpoint=None, threads=0)
    backend.set_masks({layer: 0/1 vector per output channel})
    loss, logits = backend.train_step(images, labels, lr)
    logits, taps = backend.eval_batch(images);  logits = backend.eval_logits(images)
    backend.parameters() -> {name: array};  backend.save_checkpoint(path);  backend.export_inference(path)
    read_parameters(name, checkpoint_path, names) -> {name: array}   (without building sessions)
    backend.set_update_rule(rule)   portable, specialized: every update by `rule` (update_rules.py)

Backends: "ort-training" (onnxruntime-training 1.19.2: ORT's training graph, optimizer graph and
checkpoint format), "portable" (stock onnxruntime: the lowered standard-ONNX training graph in
an InferenceSession, SGD/AdamW on the host, numpy checkpoints) and "specialized" (portable, with
each epoch's graph specialised to the selection: backprop costs what the budget buys). Nothing outside backends/ names
an ORT class.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from onnx_neq.errors import NeqError, first_line, is_runtime_error
from onnx_neq.manifest import Manifest, files_needed


class Backend(Protocol):
    manifest: Manifest

    def set_masks(self, masks: dict[str, np.ndarray]) -> None: ...
    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, np.ndarray]: ...
    def eval_batch(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...
    def eval_logits(self, images: np.ndarray) -> np.ndarray: ...
    def parameters(self) -> dict[str, np.ndarray]: ...
    def save_checkpoint(self, path: str | Path) -> None: ...
    def export_inference(self, path: str | Path) -> None: ...
    def update_bytes(self) -> int: ...  # gradients + optimizer state held for an update
    def backward_macs(self) -> int: ...  # backward MACs per image of a step with the current masks
    def set_update_rule(self, rule) -> None: ...  # host backends only; see update_rules.py


@dataclass(frozen=True)
class BackendSpec:
    module: str
    cls: str
    needs: str  # what must be installed, for the error when it is not
    files: tuple[str, ...]  # the manifest.files it reads (besides manifest.json): what a run's fingerprint covers
    absent_fix: str = "re-run `onnx-neq prepare`"  # what to do when the artifacts lack one of them


# the backend names (--backend, settings.json): written here only, used by name elsewhere
ORT_TRAINING = "ort-training"
PORTABLE = "portable"
SPECIALIZED = "specialized"

_PORTABLE_FILES = ("portable_training_model", "eval_model", "parameters")
BACKENDS = {
    ORT_TRAINING: BackendSpec(
        ".ort_training",
        "TrainingSession",
        "onnxruntime-training (pip install onnxruntime-training-cpu==1.19.2)",
        ("training_model", "eval_model", "optimizer_model", "checkpoint"),
        "these artifacts have no onnxruntime-training files (prepared where it is not installed); prepare them again in an "
        f"environment made with requirements/ort-training.txt, or train with --backend {PORTABLE}",
    ),
    PORTABLE: BackendSpec(".portable", "PortableBackend", "onnxruntime (pip install onnxruntime)", _PORTABLE_FILES),
    SPECIALIZED: BackendSpec(".specialized", "SpecializedBackend", "onnxruntime (pip install onnxruntime)", _PORTABLE_FILES),
}


def backend_files(name: str, manifest: Manifest, extra: tuple[str, ...] = ()) -> list[str]:
    """The artifact files a run on backend `name` reads, manifest.json first (its fingerprint covers them);
    `extra`: more manifest.files keys the run reads (the gradient probe's portable_training_model). An
    unknown name reads every file the manifest lists."""
    spec = BACKENDS.get(name)
    keys = (*(spec.files if spec else tuple(manifest.files)), *extra)
    return files_needed(manifest, keys, f"--backend {name}", spec.absent_fix if spec else "re-run `onnx-neq prepare`")


def training_kernels_available() -> bool:
    """True where onnxruntime-training is installed (its training API can be imported)."""
    try:
        from onnx_neq.ort_runtime import training_api

        training_api()
        return True
    except Exception:
        return False


def default_backend(artifacts_dir: str | Path | None = None) -> str:
    """ort-training where onnxruntime-training is installed and the artifacts hold its files (a board copy
    holds only the portable ones), else portable."""
    if not training_kernels_available():
        return PORTABLE
    if artifacts_dir is None:
        return ORT_TRAINING
    from onnx_neq.manifest import read_manifest

    files = read_manifest(artifacts_dir).files
    return ORT_TRAINING if all((Path(artifacts_dir) / files.get(k, k)).is_file() for k in BACKENDS[ORT_TRAINING].files) else PORTABLE


def backend_class(name: str | None, artifacts_dir: str | Path | None = None) -> type:
    """The class of backend `name` (None: default_backend); NeqError for an unknown name or missing kernels."""
    name = name or default_backend(artifacts_dir)
    spec = BACKENDS.get(name)
    if spec is None:
        raise NeqError(f"--backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name == ORT_TRAINING and not training_kernels_available():
        raise NeqError(f"--backend {ORT_TRAINING} needs {spec.needs}; on this machine use --backend {PORTABLE}")
    return getattr(importlib.import_module(spec.module, __package__), spec.cls)


def open_backend(name: str | None, artifacts_dir: str | Path, checkpoint: str | Path | None = None, threads: int = 0, **options) -> Backend:
    """`options`: backend-specific settings (bn_update for "specialized"). Artifacts are untrusted: a file
    that ONNX Runtime refuses to load is one NeqError naming the folder, never a crash."""
    cls = backend_class(name, artifacts_dir)
    try:
        return cls(artifacts_dir, checkpoint, threads=threads, **options)
    except (NeqError, OSError, MemoryError):
        raise
    except Exception as exc:
        if not is_runtime_error(exc):
            raise
        what = f"the checkpoint {checkpoint}" if checkpoint else f"the artifacts in {artifacts_dir}"
        raise NeqError(
            f"ONNX Runtime cannot load {what} ({first_line(exc)}); they are damaged or not onnx-neq's: re-run `onnx-neq prepare`"
        ) from None


def read_parameters(name: str | None, checkpoint: str | Path, names: list[str]) -> dict[str, np.ndarray]:
    """Parameters read from a checkpoint of backend `name`, without building sessions."""
    return backend_class(name).read_parameters(checkpoint, names)


def f32(x: np.ndarray) -> np.ndarray:
    """`x` as a C-contiguous float32 array (a batch of images as the graphs take it)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def checked_masks(layers: dict, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Masks by layer name as float32 vectors of the layer's width; NeqError for an unknown layer or a bad size."""
    out = {}
    for name, mask in masks.items():
        layer = layers.get(name)
        if layer is None:
            raise NeqError(f"no layer named {name!r} in the manifest")
        mask = np.asarray(mask, np.float32).reshape(-1)
        if mask.shape != (layer.out_channels,):
            raise NeqError(f"mask for {name} has {mask.size} entries; the layer has {layer.out_channels} channels")
        out[name] = mask
    return out


def updated_running_statistics(
    manifest: Manifest, outputs: list[np.ndarray], batch: int, running: Callable[[str], np.ndarray]
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, new value) of every BatchNorm running statistic after a training step: running = (1 - m) *
    running + m * batch statistic, PyTorch's train-mode update (unbiased variance). `outputs`: the batch
    mean / inverse std pairs of manifest.bn_stats, in order."""
    m = np.float32(manifest.bn_momentum)
    for stat, mean, inv_std in zip(manifest.bn_stats, outputs[0::2], outputs[1::2]):
        n = batch * stat["positions"]
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # a diverged step: the guard reports it
            variance = (1.0 / np.square(inv_std.astype(np.float64)) - stat["epsilon"]) * (n / max(n - 1, 1))
        for name, value in ((stat["running_mean"], mean), (stat["running_var"], variance)):
            yield name, ((1 - m) * running(name) + m * value.astype(np.float32)).astype(np.float32)
