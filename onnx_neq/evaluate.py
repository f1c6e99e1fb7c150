"""`onnx-neq eval`: top-1 of an inference model (ONNX Runtime inference, no training)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from .data import load_dataset, preprocess, select_classes
from .errors import NeqError
from .model_io import load_model
from .ort_runtime import inference_session

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
    meta = {p.key: p.value for p in model.metadata_props}
    if MEAN_KEY not in meta:
        raise NeqError(f"{model_path} does not record its input normalization; evaluate a model.onnx written by `onnx-neq train`")
    mean, std = ([float(v) for v in meta[k].split(",")] for k in (MEAN_KEY, STD_KEY))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    channels, size = dims[1].dim_value, (dims[2].dim_value, dims[3].dim_value)
    dataset = load_dataset(data, size)
    if classes:
        dataset = select_classes(dataset, classes)
    images = getattr(dataset, split)
    session = inference_session(model)
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(0, len(images), batch_size):
        x = preprocess(images.images[i : i + batch_size], size, channels, mean, std)
        correct += int((session.run(None, {name: x})[0].argmax(1) == images.labels[i : i + batch_size]).sum())
    return EvalResult(str(model_path), dataset.name, len(images), correct / max(1, len(images)))
