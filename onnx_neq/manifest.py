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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import NeqError

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
    def from_dict(cls, data: dict) -> Manifest:
        data = dict(data)
        data["input"] = InputSpec(**data["input"])
        data["layers"] = [Layer(**layer) for layer in data["layers"]]
        return cls(**data)


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
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NeqError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-run `onnx-neq prepare`") from None
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise NeqError(f"{path} is not an onnx-neq manifest of version {VERSION}; re-run `onnx-neq prepare`")
    try:
        return Manifest.from_dict(data)
    except TypeError as exc:
        raise NeqError(f"{path} is malformed ({exc}); re-run `onnx-neq prepare`") from None


def artifacts_fingerprint(directory: str | Path) -> str:
    """sha256 over the manifest and every file it lists: a run refuses to resume on changed artifacts."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    digest = hashlib.sha256()
    for name in [FILENAME, *sorted(manifest.files.values())]:
        path = directory / name
        digest.update(name.encode())
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()
