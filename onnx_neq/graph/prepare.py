"""`onnx-neq prepare`: an ONNX classifier -> ORT training artifacts with masks, taps and manifest."""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from onnx_neq.errors import NeqError
from onnx_neq.graph import artifacts, pipelines
from onnx_neq.graph.conv_layers import ConvLayer, find_conv_layers
from onnx_neq.graph.normalize import NormalizeReport, convert_opset, infer_shapes, normalize
from onnx_neq.graph.parameters import ParameterGroups, group_parameters
from onnx_neq.graph.passes.activation_rewrites import ActivationRewritePass
from onnx_neq.graph.passes.batchnorm_affine import BatchNormAffinePass
from onnx_neq.graph.passes.batchnorm_statistics import training_bn_positions
from onnx_neq.graph.passes.classifier_head import ClassifierHeadPass
from onnx_neq.graph.passes.dropout_removal import DropoutRemovalPass
from onnx_neq.manifest import FILENAME, InputSpec, Layer, Manifest, read_manifest, write_manifest
from onnx_neq.model_io import load_model

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class PrepareReport:
    manifest: Manifest
    directory: Path
    bn_nodes_fixed: int
    frozen_bn_rewritten: int
    dropout_removed: int
    head_replaced: tuple[int, int] | None
    normalized: NormalizeReport
    ort_training: str = ""  # why the ORT-training artifacts were not written ("" when they were)
    unreached: list[str] = field(default_factory=list)  # trained parameters the loss does not depend on


@dataclass
class _Forward:
    """The forward model as artifacts.generate takes it, and what the steps that made it found."""

    proto: onnx.ModelProto
    layers: list[ConvLayer]
    groups: ParameterGroups
    geometry: dict[str, tuple]
    bn_positions: dict[str, int]
    input_spec: InputSpec
    logits: str
    num_classes: int
    normalized: NormalizeReport
    head_replaced: tuple[int, int] | None
    dropout_removed: int
    frozen_bn_rewritten: int


def prepare(
    model_path: str | Path,
    out_dir: str | Path,
    optimizer: str = "sgd",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    weight_decay: float | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    input_shape: list[int] | None = None,
) -> PrepareReport:
    """Turn `model_path` into training artifacts in `out_dir`; nothing is left half-written."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    check_replaceable(out_dir, model_path)
    forward = _forward_model(model_path, mean, std, num_classes, seed, input_shape)
    if weight_decay is None:
        weight_decay = 0.01 if optimizer == "adamw" else 0.0
    spec = forward.input_spec
    options = {
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "mean": spec.mean,
        "std": spec.std,
        "seed": seed,
        "input_shape": input_shape,
    }
    manifest, report = _write_artifacts(forward, model_path, out_dir, options)
    return PrepareReport(
        manifest,
        out_dir,
        report.bn_nodes_fixed,
        forward.frozen_bn_rewritten,
        forward.dropout_removed,
        forward.head_replaced,
        forward.normalized,
        report.ort_training,
        report.unreached,
    )


def _forward_model(
    model_path: Path, mean: list[float] | None, std: list[float] | None, num_classes: int | None, seed: int, input_shape: list[int] | None
) -> _Forward:
    """Load, normalize and rewrite the model: one ir.Model from the opset conversion (onnx's, on a ModelProto)
    to the ModelProto artifacts.generate takes."""
    normalized = NormalizeReport()
    model = ir.serde.deserialize_model(convert_opset(load_model(model_path), normalized))
    normalize(model, normalized, input_shape)
    forward = pipelines.run("forward", model, num_classes=num_classes, seed=seed)
    head = forward[ClassifierHeadPass].replaced if num_classes else None
    dropout = forward[DropoutRemovalPass].removed
    layers = find_conv_layers(model)
    if not layers:
        raise NeqError(f"{model_path} has no Conv node, so no neurons to select; onnx-neq fine-tunes CNN classifiers")
    groups = group_parameters(model, layers)  # before the rewrites below hide BatchNorm's parameters
    inferred = model.clone()  # the shapes of every value, for the geometry only: the artifacts keep the model's own
    infer_shapes(inferred)
    geometry, bn_positions = layer_geometry(inferred, layers), training_bn_positions(inferred)
    input_spec, logits, num_classes = _describe_io(model, model_path, mean, std)
    differentiable = pipelines.run("differentiable", model)  # after grouping: the rewritten ops' parameters keep their group
    affine = differentiable[BatchNormAffinePass]
    normalized.rewritten.update(differentiable[ActivationRewritePass].rewritten)
    proto = ir.serde.serialize_model(model)
    return _Forward(
        proto, layers, groups, geometry, bn_positions, input_spec, logits, num_classes, normalized, head, dropout, len(affine.rewritten)
    )


def _write_artifacts(forward: _Forward, model_path: Path, out_dir: Path, options: dict) -> tuple[Manifest, artifacts.ArtifactsReport]:
    """The artifacts and manifest in a staging folder, renamed into place once complete."""
    staging = _staging_dir(out_dir)
    try:
        f, optimizer, weight_decay = forward, options["optimizer"], options["weight_decay"]
        report = artifacts.generate(f.proto, f.groups, f.layers, optimizer, staging, f.logits, weight_decay, f.bn_positions)
        manifest = _manifest(model_path, optimizer, f.input_spec, f.logits, f.num_classes, report, f.groups, f.layers, f.geometry)
        manifest.weight_decay = weight_decay
        manifest.output_activation = f.normalized.output_activation
        manifest.bn_stats = report.bn_stats
        manifest.prepare_options = options
        problem = manifest.problem()
        if problem:
            raise NeqError(f"{model_path}: {problem}; onnx-neq cannot fine-tune this model")
        write_manifest(manifest, staging)
        _replace_dir(staging, out_dir, model_path)
    finally:
        if (staging / STAGING_MARK).exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest, report


def _describe_io(model: ir.Model, path: Path, mean, std) -> tuple[InputSpec, str, int]:
    graph = model.graph
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    if len(inputs) != 1:
        raise NeqError(f"{path} has {len(inputs)} data inputs ({[v.name for v in inputs]}); onnx-neq expects one image input")
    if not graph.outputs:
        raise NeqError(f"{path} has no graph output")
    out = graph.outputs[0]
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise NeqError(f"{path}: input '{inputs[0].name}' has rank {len(dims)}; expected an NCHW image batch")
    if any(d is None for d in dims[1:]):
        raise NeqError(
            f"{path}: input '{inputs[0].name}' has dynamic dims {['?' if d is None else d for d in dims]}; pass --input-shape 1,3,H,W (the batch stays dynamic)"
        )
    out_dims = _dims(out)
    num_classes = out_dims[-1] if out_dims and out_dims[-1] is not None else 0
    if num_classes <= 1:
        raise NeqError(f"{path}: output '{out.name}' does not have a fixed class dimension; expected logits [N, classes]")
    meta = model.metadata_props
    mean = mean or _floats(meta.get("onnx_neq.mean")) or IMAGENET_MEAN
    std = std or _floats(meta.get("onnx_neq.std")) or IMAGENET_STD
    return InputSpec(inputs[0].name, [None, *dims[1:]], list(mean), list(std)), out.name, num_classes


def _dims(value: ir.Value) -> list[int | None]:
    """A value's dims, None where one is not a fixed size ([] where its shape is unknown)."""
    return [d if isinstance(d, int) else None for d in value.shape] if value.shape is not None else []


def _floats(text: str | None) -> list[float] | None:
    return [float(x) for x in text.split(",")] if text else None


def _manifest(
    model_path, optimizer, input_spec, logits, num_classes, report, groups: ParameterGroups, layers: list[ConvLayer], geometry: dict
) -> Manifest:
    rows = [
        Layer(
            l.name,
            l.node,
            l.weight,
            l.bias,
            l.kind,
            l.out_channels,
            l.in_channels,
            l.groups,
            list(l.kernel),
            l.neuron_cost,
            l.mask_input,
            l.tap_output,
            *geometry.get(l.name, (None, None, [])),
        )
        for l in layers
    ]
    return Manifest(
        source_model=str(Path(model_path).resolve()),
        optimizer=optimizer,
        input=input_spec,
        label_input=artifacts.LABEL_INPUT,
        logits_output=logits,
        loss_output=report.loss_output,
        num_classes=num_classes,
        neurons=sum(l.out_channels for l in layers),
        selectable_params=sum(l.params for l in layers),
        classifier_params=groups.count("classifier"),
        bn_params=groups.count("bn"),
        other_params=groups.count("other"),
        frozen_params=groups.frozen,
        always_trained=groups.bn + groups.classifier + groups.other,
        layers=rows,
        files=dict(report.files),
    )


def layer_geometry(model: ir.Model, layers: list[ConvLayer]) -> dict[str, tuple]:
    """layer -> (input [C, H, W], output [C, H, W], [BN scale, BN bias]) of a model with inferred shapes."""
    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]
    values += [out for node in model.graph for out in node.outputs]
    shapes = {}
    for v in values:
        dims = list(v.shape) if v.shape is not None else []
        if len(dims) >= 3 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            shapes[v.name] = dims[1:]
    nodes = {n.name or n.outputs[0].name: n for n in model.graph}
    consumers: dict[str, list[ir.Node]] = {}
    for n in model.graph:
        for i in n.inputs:
            consumers.setdefault(i.name if i is not None else "", []).append(n)
    out = {}
    for layer in layers:
        conv = nodes.get(layer.node)
        if conv is None:
            continue
        bn = [n for n in consumers.get(layer.output, []) if n.op_type == "BatchNormalization"]
        out[layer.name] = (
            shapes.get(conv.inputs[0].name),
            shapes.get(layer.output),
            [v.name if v is not None else "" for v in bn[0].inputs[1:3]] if bn else [],
        )
    return out


STAGING_MARK = ".onnx-neq-staging"  # in a staging folder until it is renamed into place: proof that it is ours


def _staging_dir(out_dir: Path) -> Path:
    """A fresh staging folder beside `out_dir` (which prepare() checked first), after removing the staging
    folders that killed prepares left there."""
    _remove_stale_staging(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging) if (staging / STAGING_MARK).exists() else _refuse(staging, "is in the way and not ours")
    staging.mkdir(parents=True)
    (staging / STAGING_MARK).touch()
    return staging


def check_replaceable(out_dir: Path, model_path: Path) -> None:
    """NeqError unless `out_dir` is new, empty, or artifacts that prepare wrote (a valid manifest and
    nothing but the files it lists); never the working folder, one above it, or one holding the model."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        _refuse(out_dir, "exists and is not a directory")
    resolved = out_dir.resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        _refuse(out_dir, "is the working folder (or holds it)")
    if Path(model_path).resolve().is_relative_to(resolved):
        _refuse(out_dir, f"holds the input model {model_path}")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        foreign = _foreign_entries(out_dir)
        if foreign:
            _refuse(out_dir, f"holds files that onnx-neq did not write ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''})")


def _foreign_entries(directory: Path) -> list[str]:
    """Entries of `directory` that are not files of the artifacts its manifest describes (all of them
    when it has no valid onnx-neq manifest)."""
    entries = sorted(p.name for p in directory.iterdir())
    try:
        ours = {FILENAME, *read_manifest(directory).files.values()}
    except NeqError:
        return entries
    return [name for name in entries if name not in ours or (directory / name).is_symlink() or not (directory / name).is_file()]


def _refuse(out_dir: Path, why: str) -> None:
    raise NeqError(f"-o {out_dir} {why}; prepare replaces only artifacts it wrote: choose a new or empty -o directory")


def _remove_stale_staging(out_dir: Path) -> None:
    """Staging folders of prepares that were killed (their process is gone) and that carry our mark."""
    for path in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = re.fullmatch(r"(\d+)(-old)?", path.name[len(f".{out_dir.name}.partial-") :])
        if pid and not _alive(int(pid[1])) and (path / STAGING_MARK).is_file() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _replace_dir(staging: Path, out_dir: Path, model_path: Path) -> None:
    """Rename the staging folder into place; an existing out_dir is checked again and moved aside first,
    so a failure at any moment leaves either the old artifacts or the new ones."""
    if out_dir.exists():
        check_replaceable(out_dir, model_path)
    (staging / STAGING_MARK).unlink()
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-old"
    out_dir.rename(old)
    (old / STAGING_MARK).touch()
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
