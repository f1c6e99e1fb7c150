"""Load and save ONNX files with errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import onnx

from .errors import NeqError

MAX_IR_VERSION = 10  # what onnxruntime-training 1.19.2 reads


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read `path` as an ONNX model, or raise NeqError saying why not and what to do."""
    path = Path(path)
    if not path.exists():
        raise NeqError(f"{path}: no such file")
    if path.is_dir():
        raise NeqError(f"{path} is a directory; pass the .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise NeqError(f"{path} is not a readable ONNX model ({_why(exc)}); it may be truncated or another format, re-export it") from None
    if not model.graph.node:
        raise NeqError(f"{path} is not an ONNX model (no graph nodes); re-export it")
    _check_external_data(model, path)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)  # prepare converts opsets; IR 11 adds nothing a CNN uses
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise NeqError(f"{path} fails the ONNX checker ({_why(exc)}); it may be truncated, re-export it") from None
    return model


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else exc.__class__.__name__)[:200]


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import uses_external_data

    if any(uses_external_data(t) for t in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise NeqError(f"{path}: cannot read its external weight files ({_why(exc)}); keep them beside the model") from None


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
