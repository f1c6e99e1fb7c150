"""Load and save ONNX files with errors a user can act on."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from onnx_neq.errors import NeqError

MAX_IR_VERSION = 10  # what onnxruntime-training 1.19.2 reads


MODEL_FIX = "re-export the model"  # how a model's messages end; an artifact's end in its own fix instead
MAX_TENSOR_ELEMENTS = 1 << 31  # 8 GiB of float32 in one tensor: beyond any CNN onnx-neq fine-tunes


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read `path` as an ONNX model, or raise NeqError saying why not and what to do. Every tensor's
    declared size is checked against the bytes it holds, and external weights must lie in the model's
    folder, before any of them is read."""
    path = Path(path)
    if not path.exists():
        raise NeqError(f"{path}: no such file")
    if path.is_dir():
        raise NeqError(f"{path} is a directory; pass the .onnx file")
    model = read_unchecked(path)
    if not model.graph.node:
        raise NeqError(f"{path} is not an ONNX model (no graph nodes); re-export it")
    check_tensors(model, path, path.parent)
    _load_external_data(model, path)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)  # prepare converts opsets; IR 11 adds nothing a CNN uses
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise NeqError(f"{path} fails the ONNX checker ({_why(exc)}); it may be truncated, re-export it") from None
    return model


def read_unchecked(path: Path) -> onnx.ModelProto:
    """The protobuf of `path` without its external data (nothing outside the file is opened)."""
    if not path.is_file():
        raise NeqError(f"{path} is not a regular file; pass an .onnx file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise NeqError(f"{path} is not a readable ONNX model ({_why(exc)}); it may be truncated or another format, re-export it") from None


def check_model_file(path: Path, folder: Path, fix: str) -> None:
    """An ONNX file of a folder someone handed us (artifacts): a regular file inside `folder`, readable,
    every tensor's size matching its bytes and every external weight inside `folder`; else NeqError."""
    if not path.resolve().is_relative_to(folder.resolve()):
        raise NeqError(f"{path} leads outside {folder}; {fix}")
    if not path.exists():
        raise NeqError(f"{path} is missing; {fix}")
    try:
        check_tensors(read_unchecked(path), path, folder)
    except NeqError as exc:
        message = str(exc).removesuffix(f"; {MODEL_FIX}").removesuffix(f", {MODEL_FIX}")
        raise NeqError(f"{message}; {fix}") from None


def check_tensors(model: onnx.ModelProto, path: Path, folder: Path) -> None:
    """NeqError for a tensor whose shape declares other than the values it holds (or absurdly many), whose
    external data lies outside `folder` (an absolute path, '..', a link leading out) or past its file's
    end, or for a name that is not text (protobuf hands back bytes where a damaged name is not UTF-8)."""
    _check_names(model, path)
    for tensor in _all_tensors(model):
        count = _declared_count(tensor, path)
        if uses_external_data(tensor):
            _check_external(tensor, count, path, folder)
        else:
            _check_inline(tensor, count, path)


def _check_names(model: onnx.ModelProto, path: Path) -> None:
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        names = [v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)]
        for node in graph.node:
            names.extend([node.name, node.op_type, node.domain, *node.input, *node.output])
        if not all(isinstance(name, str) for name in names):
            raise NeqError(f"{path} holds names that are not text (the file is damaged); re-export the model")
        graphs.extend(_attribute_graphs(graph.node))


def _all_tensors(model: onnx.ModelProto):
    graphs = [model.graph, *(g for f in model.functions for g in _attribute_graphs(f.node))]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attribute in node.attribute:
                yield from ([attribute.t] if attribute.HasField("t") else [])
                yield from attribute.tensors
        graphs.extend(_attribute_graphs(graph.node))


def _attribute_graphs(nodes):
    for node in nodes:
        for attribute in node.attribute:
            yield from ([attribute.g] if attribute.HasField("g") else [])
            yield from attribute.graphs


def _declared_count(tensor: onnx.TensorProto, path: Path) -> int:
    if any(d < 0 for d in tensor.dims):
        raise NeqError(f"{path}: tensor {tensor.name!r} has a negative dimension {list(tensor.dims)}; re-export the model")
    count = math.prod(tensor.dims)
    if count > MAX_TENSOR_ELEMENTS:
        raise NeqError(f"{path}: tensor {tensor.name!r} declares {count:,} values (shape {list(tensor.dims)}); re-export the model")
    return count


def _itemsize(tensor: onnx.TensorProto, path: Path) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        raise NeqError(f"{path}: tensor {tensor.name!r} has an unknown data type {tensor.data_type}; re-export the model") from None


_PACKED_4BIT = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4") if hasattr(onnx.TensorProto, name)}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _check_inline(tensor: onnx.TensorProto, count: int, path: Path) -> None:
    if tensor.data_type == onnx.TensorProto.STRING:
        held = len(tensor.string_data)
    elif tensor.HasField("raw_data") and tensor.data_type in _PACKED_4BIT:
        held = count if 2 * len(tensor.raw_data) in (count, count + 1) else 2 * len(tensor.raw_data)
    elif tensor.HasField("raw_data"):
        held = len(tensor.raw_data) / _itemsize(tensor, path)
    else:
        held = sum(len(getattr(tensor, field)) for field in _TYPED_FIELDS)
        held //= 2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
    if held != count:
        raise NeqError(
            f"{path}: tensor {tensor.name!r} declares shape {list(tensor.dims)} ({count:,} values) but holds {held:,}; "
            "the file is damaged or crafted, re-export the model"
        )


def _check_external(tensor: onnx.TensorProto, count: int, path: Path, folder: Path) -> None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    target = folder / location
    if (
        not location
        or Path(location).is_absolute()
        or ".." in Path(location).parts
        or not target.resolve().is_relative_to(folder.resolve())
    ):
        raise NeqError(
            f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the folder {folder}; keep weight files beside the model"
        )
    if not target.is_file():
        raise NeqError(f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, which is not a file in {folder}")
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", target.stat().st_size))
    except ValueError:
        raise NeqError(f"{path}: tensor {tensor.name!r} has a malformed external-data offset or length; re-export the model") from None
    needed = count * _itemsize(tensor, path)
    if offset < 0 or length < needed or offset + needed > target.stat().st_size:
        raise NeqError(
            f"{path}: tensor {tensor.name!r} needs {needed:,} bytes of {location!r} at offset {offset:,}, which holds {target.stat().st_size:,}; "
            "the weight file is damaged or does not belong to this model"
        )


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else exc.__class__.__name__)[:200]


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    if any(uses_external_data(t) for t in _all_tensors(model)):
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
