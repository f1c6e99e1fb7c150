"""Export a torchvision-shaped CNN from PyTorch to an ONNX file that ORT 1.19.2 can train.

torch -> ONNX (opset 17, IR <= 10, no constant folding, training-mode graph). Needs torch.
With `bn="frozen"` the BatchNorm layers are exported in inference mode (running statistics
normalize during training too); with `bn="train"` they use batch statistics while training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from onnx_neq.errors import NeqError

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# torchvision's ImageNet normalization (what its weights expect); the paper's recipe uses 0.5 / 0.5.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ExportReport:
    arch: str
    num_classes: int
    resolution: int
    params: int
    weights_loaded: str | None
    head_replaced: bool
    max_abs_diff: float


def load_state_dict(model, weights: Path, num_classes: int) -> bool:
    """Load a torchvision .pth into `model` strictly; returns True if the head was re-initialized."""
    import torch

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NeqError(f"weights file {weights} does not exist") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise NeqError(
            f"cannot read {weights} as a PyTorch state dict ({exc.__class__.__name__}); pass a .pth file saved with torch.save(model.state_dict())"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise NeqError(f"{weights} holds a {type(state).__name__}, not a state dict; save it with torch.save(model.state_dict(), path)")
    own = model.state_dict()
    head = _head_keys(model)
    head_replaced = any(k in state and state[k].shape != own[k].shape for k in head)
    if head_replaced:  # --num-classes differs from the weights': keep the freshly initialized head
        state = {**{k: v for k, v in state.items() if k not in head}, **{k: own[k] for k in head}}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(items[:3])}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if items
        )
        raise NeqError(f"{weights} does not match this architecture ({detail}); check the architecture name and --width-mult")
    model.load_state_dict(state, strict=True)
    return head_replaced


def _head_keys(model) -> set[str]:
    return {k for k in model.state_dict() if k.startswith(("fc.", "classifier."))}


def export(
    arch: str,
    output: Path,
    weights: Path | None = None,
    num_classes: int = 1000,
    resolution: int = 224,
    width_mult: float = 1.0,
    bn: str = "train",
    seed: int = 0,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ExportReport:
    """Build `arch`, load `weights`, and write a trainable ONNX model to `output`."""
    import torch

    from onnx_neq.architectures import build

    torch.manual_seed(seed)
    model = build(arch, num_classes, width_mult)
    head_replaced = load_state_dict(model, weights, num_classes) if weights else False
    diff = export_module(model, output, resolution, bn, mean, std, name=arch)
    params = sum(p.numel() for p in model.parameters())
    return ExportReport(arch, num_classes, resolution, params, str(weights) if weights else None, head_replaced, diff)


def export_module(
    model,
    output: Path,
    resolution: int,
    bn: str = "train",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    name: str = "custom",
) -> float:
    """Export any torch CNN classifier (NCHW image in, logits out); returns max |ORT - torch|."""
    import torch

    if bn not in ("train", "frozen"):
        raise NeqError(f"--bn must be 'train' or 'frozen', not {bn!r}")
    model.eval()
    dummy = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        reference = model(dummy).numpy()
    _torch_export(model, dummy, Path(output), bn)
    _record_metadata(Path(output), name, mean or list(IMAGENET_MEAN), std or list(IMAGENET_STD))
    diff = _check_against_ort(Path(output), dummy.numpy(), reference)
    log.info("exported %s to %s (max |ORT - torch| = %.2e)", name, output, diff)
    return diff


def _torch_export(model, dummy, output: Path, bn: str) -> None:
    """Trace in training mode; BatchNorm momentum 0 so tracing leaves the running stats as loaded."""
    import warnings

    import torch

    model.train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
        if bn == "frozen":
            m.eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _onnx_export(model, dummy, output)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def _onnx_export(model, dummy, output: Path) -> None:
    import torch

    torch.onnx.export(
        model,
        (dummy,),
        str(output),
        dynamo=False,
        opset_version=OPSET,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        export_params=True,
        keep_initializers_as_inputs=False,
    )


def _record_metadata(path: Path, arch: str, mean: list[float], std: list[float]) -> None:
    """Store the input normalization in the ONNX file, where prepare reads it."""
    import onnx

    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise NeqError(f"--mean and --std take 3 values each (std > 0), got {mean} and {std}")
    model = onnx.load(str(path))
    meta = {"onnx_neq.arch": arch, "onnx_neq.mean": ",".join(map(str, mean)), "onnx_neq.std": ",".join(map(str, std))}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _check_against_ort(path: Path, x, reference) -> float:
    """Run the exported graph in inference form through ORT and compare with torch's eval forward."""
    import numpy as np
    import onnx

    from onnx_neq.graph.inference import to_inference_model
    from onnx_neq.ort_runtime import inference_session

    model = to_inference_model(onnx.load(str(path)))
    out = inference_session(model).run(None, {INPUT_NAME: x})[0]
    return float(np.max(np.abs(out - reference)))
