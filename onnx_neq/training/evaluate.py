"""`onnx-neq eval`: top-1 of an inference model (ONNX Runtime inference, no training)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_neq.data.datasets import load_dataset, preprocess, select_classes
from onnx_neq.errors import NeqError, first_line, is_runtime_error
from onnx_neq.manifest import MAX_DIM
from onnx_neq.model_io import load_model
from onnx_neq.ort_runtime import inference_session

MEAN_KEY, STD_KEY = "onnx_neq.mean", "onnx_neq.std"


@dataclass
class EvalResult:
    model: str
    data: str
    images: int
    top1: float


def record_normalization(path: Path, mean: list[float], std: list[float]) -> None:
    """Write the input normalization into an inference model, where `eval` finds it."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    model.metadata_props.add(key=MEAN_KEY, value=",".join(map(str, mean)))
    model.metadata_props.add(key=STD_KEY, value=",".join(map(str, std)))
    onnx.save(model, str(path))


def evaluate(model_path: str | Path, data: str, classes: list[int] | None = None, split: str = "test", batch_size: int = 256) -> EvalResult:
    model = load_model(model_path)
    mean, std = _normalization(model, model_path)
    channels, size = _image_input(model, model_path)
    dataset = load_dataset(data, size)
    if classes:
        dataset = select_classes(dataset, classes)
    images = getattr(dataset, split)
    session = inference_session(model)
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(0, len(images), batch_size):
        x = preprocess(images.images[i : i + batch_size], size, channels, mean, std)
        correct += int((_logits(session, name, x, model_path).argmax(1) == images.labels[i : i + batch_size]).sum())
    return EvalResult(str(model_path), dataset.name, len(images), correct / max(1, len(images)))


def _normalization(model: onnx.ModelProto, path) -> tuple[list[float], list[float]]:
    """The mean and std recorded by `train`; NeqError when they are absent or not finite numbers."""
    meta = {p.key: p.value for p in model.metadata_props}
    if MEAN_KEY not in meta or STD_KEY not in meta:
        raise NeqError(f"{path} does not record its input normalization; evaluate a model.onnx written by `onnx-neq train`")
    try:
        mean, std = ([float(v) for v in meta[k].split(",")] for k in (MEAN_KEY, STD_KEY))
    except ValueError:
        mean, std = [], []
    if not mean or len(mean) != len(std) or not all(math.isfinite(v) for v in mean) or not all(math.isfinite(v) and v > 0 for v in std):
        raise NeqError(
            f"{path}: its recorded normalization ({meta[MEAN_KEY][:40]!r}, {meta[STD_KEY][:40]!r}) is not finite numbers; re-export it"
        )
    return mean, std


def _image_input(model: onnx.ModelProto, path) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) of the model's image input [N, C, H, W]; NeqError when it has no such input."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    if len(dims) != 4 or not all(0 < d <= MAX_DIM for d in dims[1:]):
        raise NeqError(
            f"{path}: expected one image input [N, C, H, W] with fixed C, H, W; evaluate a model.onnx written by `onnx-neq train`"
        )
    return dims[1], (dims[2], dims[3])


def _logits(session, name: str, x, path) -> np.ndarray:
    try:
        logits = session.run(None, {name: x})[0]
    except Exception as exc:
        if not is_runtime_error(exc):
            raise
        raise NeqError(f"ONNX Runtime cannot run {path} ({first_line(exc)}); it is damaged or not a classifier, re-export it") from None
    if logits.ndim < 2 or len(logits) != len(x):
        raise NeqError(f"{path}: its first output has shape {list(logits.shape)}, not class scores [N, classes]")
    return logits.reshape(len(x), -1)
