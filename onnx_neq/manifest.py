"""manifest.json: the one contract between the graph side (prepare) and the training side (train).

Fields (all counts are numbers of scalar parameters unless said otherwise):
  format, version          "onnx-neq-manifest", 1
  source_model             the ONNX file prepare read
  optimizer                "sgd" | "adamw" (what optimizer_model.onnx implements)
  weight_decay             AdamW's decoupled weight decay baked into optimizer_model.onnx (0 for SGD)
  input                    {name, shape (null = dynamic), mean, std, layout: "NCHW"}
  label_input              name of the int64 label input of the training graph
  logits_output            name of the logits output (training and eval graphs)
  loss_output              name of the loss output
  num_classes              width of the logits
  neurons                  total selectable neurons (output channels of all Convs)
  selectable_params        total parameters of all Convs (weights + biases)
  classifier_params        Gemm/MatMul head parameters: always trained, never budgeted
  bn_params                BatchNorm scale + bias: always trained, never budgeted
  other_params             other trainable parameters (PRelu slopes, norm scales)
  frozen_params            names of frozen initializers (BatchNorm running statistics, ...)
  always_trained           names of the parameters trained without masks
  layers                   in graph order: {name, node, weight, bias, kind (conv|depthwise|grouped),
                           out_channels, in_channels, groups, kernel, neuron_cost, mask_input,
                           tap_output, input_shape, output_shape ([C, H, W] per image, null if
                           unknown), bn ([scale, bias] of the BatchNorm on its output, or [])}
  files                    {training_model, eval_model, optimizer_model, checkpoint}
  output_activation        {op, axis, output} of a Softmax/LogSoftmax removed from the source model's
                           output (null if none); inference models get it back
  prepare_options          the prepare options (optimizer, weight_decay, mean, std, seed, input_shape)
                           that `train` re-uses to prepare the source model with another head
  bn_stats                 training-mode BatchNorms whose running statistics train updates:
                           [{running_mean, running_var, batch_mean, batch_inv_std, epsilon,
                           positions (H*W per image)}]; batch_mean / batch_inv_std are training outputs
  bn_momentum              PyTorch-convention momentum of that update (0.1)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from stat import S_ISREG

from onnx_neq.errors import NeqError
from onnx_neq.typed_json import build, read_json

FORMAT = "onnx-neq-manifest"
VERSION = 1
FILENAME = "manifest.json"


@dataclass
class Layer:
    name: str
    node: str
    weight: str
    bias: str | None
    kind: str
    out_channels: int
    in_channels: int
    groups: int
    kernel: list[int]
    neuron_cost: int
    mask_input: str
    tap_output: str
    input_shape: list[int] | None = None  # [C, H, W] per image of the conv's input (cost models)
    output_shape: list[int] | None = None  # [C, H, W] per image of its raw output
    bn: list[str] = field(default_factory=list)  # scale and bias of the BatchNorm that normalizes its output

    @property
    def params(self) -> int:
        return self.out_channels * self.neuron_cost


@dataclass
class InputSpec:
    name: str
    shape: list[int | None]
    mean: list[float]
    std: list[float]
    layout: str = "NCHW"


@dataclass
class Manifest:
    source_model: str
    optimizer: str
    input: InputSpec
    label_input: str
    logits_output: str
    loss_output: str
    num_classes: int
    neurons: int
    selectable_params: int
    classifier_params: int
    bn_params: int
    other_params: int
    frozen_params: list[str]
    always_trained: list[str]
    layers: list[Layer]
    files: dict[str, str] = field(default_factory=dict)
    weight_decay: float = 0.0
    output_activation: dict | None = None
    prepare_options: dict | None = None
    bn_stats: list[dict] = field(default_factory=list)
    bn_momentum: float = 0.1
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict, where: str = FILENAME) -> Manifest:
        """A manifest from parsed JSON, every field's type and range checked (NeqError otherwise)."""
        fix = "re-run `onnx-neq prepare`"
        manifest = build(cls, data, where, fix)
        problem = manifest.problem()
        if problem:
            raise NeqError(f"{where}: {problem}; {fix}")
        return manifest

    def problem(self) -> str | None:
        """What makes this manifest unusable (a count out of range, a file outside its folder), or None."""
        checks = [self._io_problem(), self._files_problem(), *(_layer_problem(layer) for layer in self.layers)]
        checks += [_bn_stat_problem(stat) for stat in self.bn_stats]
        return next((p for p in checks if p), None)

    def _io_problem(self) -> str | None:
        shape = self.input.shape
        if len(shape) != 4 or not all(isinstance(d, int) and 0 < d <= MAX_DIM for d in shape[1:]):
            return f"input.shape {shape} is not [N, C, H, W] with C, H, W between 1 and {MAX_DIM}"
        if len(self.input.mean) != shape[1] or len(self.input.std) != shape[1] or not all(_finite(v) for v in self.input.mean):
            return f"input.mean and input.std need one finite value per channel ({shape[1]})"
        if not all(_finite(v) and v > 0 for v in self.input.std):
            return "input.std values must be finite and positive"
        if not 2 <= self.num_classes <= MAX_DIM or not self.layers or self.optimizer not in ("sgd", "adamw"):
            return "num_classes, layers or optimizer out of range (at least 2 classes, one layer, sgd or adamw)"
        if not (_finite(self.weight_decay) and self.weight_decay >= 0 and _finite(self.bn_momentum) and 0 <= self.bn_momentum <= 1):
            return "weight_decay or bn_momentum out of range"
        return None

    def _files_problem(self) -> str | None:
        bad = [name for name in self.files.values() if not _plain_name(name)]
        if bad:
            return f"files names {bad[0]!r}, a path leading outside the artifacts folder (only plain file names are allowed)"
        return None


MAX_DIM = 1 << 16  # channels, classes, height or width: beyond this a manifest is not one of ours
LAYER_KINDS = ("conv", "depthwise", "grouped")


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _plain_name(name: str) -> bool:
    """A file name with no directory part: nothing a manifest names can lie outside its folder."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name and ":" not in name


def _layer_problem(layer: Layer) -> str | None:
    counts = (layer.out_channels, layer.in_channels, layer.groups, layer.neuron_cost)
    if not all(0 < c <= MAX_DIM * MAX_DIM for c in counts) or layer.kind not in LAYER_KINDS:
        return f"layer {layer.name!r} has counts {counts} or kind {layer.kind!r} out of range"
    if not layer.kernel or not all(0 < k <= MAX_DIM for k in layer.kernel):
        return f"layer {layer.name!r} has kernel {layer.kernel}"
    for shape in (layer.input_shape, layer.output_shape):
        if shape is not None and (len(shape) != 3 or not all(0 < d <= MAX_DIM for d in shape)):
            return f"layer {layer.name!r} has shape {shape}, not [C, H, W]"
    return None


def _bn_stat_problem(stat: dict) -> str | None:
    names = ("running_mean", "running_var", "batch_mean", "batch_inv_std")
    if not all(isinstance(stat.get(k), str) for k in names):
        return f"bn_stats entry lacks the names {list(names)}"
    epsilon, positions = stat.get("epsilon"), stat.get("positions")
    if not (isinstance(epsilon, int | float) and _finite(epsilon) and epsilon >= 0):
        return f"bn_stats epsilon {epsilon!r} is not a finite number >= 0"
    if not (isinstance(positions, int) and 0 < positions <= MAX_DIM * MAX_DIM):
        return f"bn_stats positions {positions!r} is not a positive integer"
    return None


def artifact_path(directory: str | Path, name: str) -> Path:
    """The file `name` of an artifacts folder; NeqError when it (or a link on the way) leads outside it."""
    directory = Path(directory)
    path = directory / name
    if not _plain_name(name) or not path.resolve().is_relative_to(directory.resolve()):
        raise NeqError(f"{path} leads outside the artifacts folder {directory}; re-run `onnx-neq prepare`")
    return path


def write_manifest(manifest: Manifest, directory: Path) -> Path:
    path = Path(directory) / FILENAME
    path.write_text(manifest.to_json())
    return path


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of an artifacts directory, or NeqError naming what is wrong and the fix."""
    directory = Path(directory)
    path = directory / FILENAME
    if not directory.is_dir():
        raise NeqError(f"{directory}: no such artifacts directory; create it with `onnx-neq prepare MODEL.onnx -o {directory}`")
    if not path.exists():
        raise NeqError(f"{directory} has no {FILENAME}; it is not an onnx-neq artifacts directory (run `onnx-neq prepare` first)")
    data = read_json(path, "re-run `onnx-neq prepare`")
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise NeqError(f"{path} is not an onnx-neq manifest of version {VERSION}; re-run `onnx-neq prepare`")
    return Manifest.from_dict(data, str(path))


def files_needed(manifest: Manifest, keys: tuple[str, ...], reader: str, absent_fix: str = "re-run `onnx-neq prepare`") -> list[str]:
    """The artifact files named by manifest.files `keys`, manifest.json first: what a run's fingerprint covers.
    `reader` names who reads them for the error when the manifest lacks one, with `absent_fix`."""
    absent = [key for key in keys if key not in manifest.files]
    if absent:
        raise NeqError(f"the artifacts' {FILENAME} names no {absent[0]} file, which {reader} reads; {absent_fix}")
    return [FILENAME, *sorted({manifest.files[key] for key in keys})]


def artifacts_fingerprint(directory: str | Path, files: list[str] | None = None) -> str:
    """sha256 over the names and bytes of `files` (files_needed) of an artifacts folder: a run refuses to
    resume when one of them changed, and not when another file comes or goes. Each must be readable
    (NeqError naming it). Without `files`: the manifest and every file it lists, absent ones skipped (the
    fingerprint of runs from before per-backend file lists, and the default model's cache key)."""
    directory = Path(directory)
    if files is None:
        names = [FILENAME, *sorted(read_manifest(directory).files.values())]
        return _digest([(name, directory / name) for name in names], required=False, files=names)
    return _digest([(name, artifact_path(directory, name)) for name in files], required=True, files=files)


def _digest(paths: list[tuple[str, Path]], required: bool, files: list[str]) -> str:
    digest = hashlib.sha256()
    for name, path in paths:
        digest.update(name.encode())
        if required or path.is_file():
            _hash_file(digest, path, files)
    return digest.hexdigest()


def _hash_file(digest, path: Path, files: list[str]) -> None:
    try:
        if not S_ISREG(os.stat(path).st_mode):  # a folder, named pipe or device is never opened
            raise IsADirectoryError(0, "not a regular file")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        why = "is missing" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror or exc})"
        raise NeqError(
            f"{path} {why}; this run reads {', '.join(files)} of the artifacts: copy it from the folder `onnx-neq prepare` wrote"
        ) from None


def artifact_model(directory: str | Path, manifest: Manifest, key: str) -> Path:
    """The ONNX file `key` of an artifacts folder, checked before ONNX Runtime opens it: inside the folder
    (links included), every tensor holding the bytes it declares, external weights inside the folder."""
    from onnx_neq.model_io import check_model_file

    if key not in manifest.files:
        raise NeqError(f"{directory}: the manifest names no {key} file; re-run `onnx-neq prepare`")
    path = artifact_path(directory, manifest.files[key])
    check_model_file(path, Path(directory), "re-run `onnx-neq prepare`")
    return path
