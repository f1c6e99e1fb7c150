"""Generate ONNX Runtime training artifacts and apply the onnx-neq passes to them.

forward model -> training_model.onnx (+ gradient masks), eval_model.onnx (+ activation taps,
single-output BatchNorm), optimizer_model.onnx (SGD or AdamW), checkpoint.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from .conv_layers import ConvLayer
from .errors import NeqError, first_line, is_runtime_error
from .ort_runtime import artifacts_module, captured_native_stderr
from .parameters import ParameterGroups
from .passes.activation_rewrites import REWRITTEN_OPS
from .passes.activation_taps import ActivationTapPass
from .passes.batchnorm_inference import BatchNormInferencePass
from .passes.batchnorm_statistics import BatchNormStatisticsPass
from .passes.gradient_masks import GradientMaskPass

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
LABEL_INPUT = "labels"
FILES = {
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
    "portable_training_model": "portable_training_model.onnx",
    "parameters": "parameters.npz",
}


@dataclass
class ArtifactsReport:
    loss_output: str
    mask_inputs: list[str]
    taps: list[str]
    bn_nodes_fixed: int
    bn_stats: list[dict]


def generate(
    model: onnx.ModelProto,
    groups: ParameterGroups,
    layers: list[ConvLayer],
    optimizer: str,
    directory: Path,
    logits: str,
    weight_decay: float = 0.0,
    bn_positions: dict[str, int] | None = None,
) -> ArtifactsReport:
    """Write the ORT artifacts and the portable ones into `directory` and apply masks and taps.
    `bn_positions`: running_mean -> H*W of each training-mode BatchNorm (their statistics become outputs)."""
    if optimizer not in OPTIMIZERS:
        raise NeqError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    _generate_ort_artifacts(model, groups, _optimizer_block(optimizer, weight_decay), directory, logits)
    user_inputs = [v.name for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
    masks = GradientMaskPass(layers, user_inputs + [LABEL_INPUT])
    stats = BatchNormStatisticsPass(bn_positions or {})
    training = _rewrite(directory / FILES["training_model"], [masks, stats])
    taps, bn = ActivationTapPass(layers), BatchNormInferencePass()
    _rewrite(directory / FILES["eval_model"], [bn, taps])
    _write_portable(directory, [name for s in stats.stats for name in (s["batch_mean"], s["batch_inv_std"])])
    return ArtifactsReport(training.graph.outputs[0].name, masks.report.mask_inputs, taps.taps, bn.changed, stats.stats)


def _write_portable(directory: Path, keep_outputs: list[str]) -> None:
    """The lowered (standard-ONNX) training graph and every parameter of the checkpoint as .npz,
    for the portable backend on stock onnxruntime."""
    import numpy as np

    from .lowering import lower_training_model
    from .ort_runtime import training_api

    lowered, _ = lower_training_model(onnx.load(str(directory / FILES["training_model"])), keep_outputs=keep_outputs)
    onnx.save(lowered, str(directory / FILES["portable_training_model"]))
    with captured_native_stderr():
        state = training_api().CheckpointState.load_checkpoint(str(directory / FILES["checkpoint"]))
        params = {name: np.array(p.data) for name, p in state.parameters}
    with open(directory / FILES["parameters"], "wb") as f:
        np.savez(f, **params)


def _optimizer_block(optimizer: str, weight_decay: float):
    """ORT's optimizer block: plain SGD, or AdamW with decoupled weight decay (ORT's default is 0)."""
    art = artifacts_module()
    if optimizer == "sgd":
        if weight_decay:
            raise NeqError("ORT's SGD has no weight decay; use --optimizer adamw for --weight-decay")
        return art.OptimType.SGD
    return art.onnxblock.optim.AdamW(weight_decay=weight_decay)


_CONTROL_FLOW = ("If", "Loop", "Scan")


def _refuse_control_flow(model: onnx.ModelProto) -> None:
    """ORT 1.19.2's gradient builder aborts the whole process on some If nodes: refuse them first."""
    found = [n for n in model.graph.node if n.op_type in _CONTROL_FLOW and n.domain in ("", "ai.onnx")]
    if found:
        names = ", ".join(f"{n.op_type} '{n.name or n.output[0]}'" for n in found[:4]) + (
            f" and {len(found) - 4} more" if len(found) > 4 else ""
        )
        raise NeqError(
            f"the model has control flow ({names}), which onnxruntime-training cannot differentiate; export it so "
            "that the branches fold away (static shapes; for PyTorch's LocalResponseNorm, which exports an If, use an ONNX LRN node)"
        )


def _generate_ort_artifacts(model: onnx.ModelProto, groups: ParameterGroups, optim, directory: Path, logits: str) -> None:
    _refuse_control_flow(model)
    directory.mkdir(parents=True, exist_ok=True)
    error = _try_generate(model, groups, optim, directory, logits)
    if error is None:
        return
    if _no_gradient_op(error) is None:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else error.__class__.__name__
        raise NeqError(f"onnxruntime-training could not build the training graph: {first[:300]}")
    raise NeqError(_untrainable_message(_untrainable_ops(model, groups, optim, logits, error)))


def _try_generate(model: onnx.ModelProto, groups: ParameterGroups, optim, directory: Path, logits: str) -> RuntimeError | None:
    art = artifacts_module()
    with captured_native_stderr():
        try:
            art.generate_artifacts(
                model,
                requires_grad=groups.trainable,
                frozen_params=groups.frozen,
                loss=art.LossType.CrossEntropyLoss,
                optimizer=optim,
                artifact_directory=str(directory),
                additional_output_names=[logits],
            )
        except RuntimeError as exc:
            return exc
        except Exception as exc:  # onnx's shape inference on a model whose types do not fit its ops
            if not is_runtime_error(exc) and not type(exc).__module__.startswith("onnx"):
                raise
            return RuntimeError(f"{exc.__class__.__name__}: {first_line(exc)}")
    return None


_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\S+) for node")
_MAX_ROUNDS = 6


def _no_gradient_op(error: RuntimeError) -> str | None:
    match = _NO_GRADIENT.search(str(error))
    return match.group(1) if match else None


def _untrainable_ops(model: onnx.ModelProto, groups, optim, logits: str, error: RuntimeError) -> dict[str, list[str]]:
    """Every op type ORT cannot differentiate, with its nodes: ORT names one op per attempt, so each
    found op is stood in for by Identity in a scratch copy and the gradient build tried again."""
    found: dict[str, list[str]] = {}
    scratch = onnx.ModelProto()
    scratch.CopyFrom(model)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(_MAX_ROUNDS):
            op = _no_gradient_op(error) if error is not None else None
            if op is None or op in found:
                break
            found[op] = [n.name or f"#{i}" for i, n in enumerate(model.graph.node) if n.op_type == op]
            for node in scratch.graph.node:
                if node.op_type == op and node.input:
                    node.op_type, node.domain = "Identity", ""
                    del node.input[1:], node.output[1:], node.attribute[:]
            error = _try_generate(scratch, groups, optim, Path(tmp), logits)
    return found


def _untrainable_message(found: dict[str, list[str]]) -> str:
    parts = []
    for op, nodes in found.items():
        shown = ", ".join(f"'{n}'" for n in nodes[:8]) + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else "")
        parts.append(f"{op} (nodes {shown})")
    return (
        f"ops with no gradient in onnxruntime-training 1.19.2: {'; '.join(parts)}; replace them with differentiable ops "
        f"in the source model before exporting (prepare rewrites {', '.join(REWRITTEN_OPS)} itself)"
    )


def _rewrite(path: Path, passes: list[ir.passes.PassBase]) -> ir.Model:
    model = ir.load(str(path))
    ir.passes.Sequential(*passes)(model)
    ir.save(model, str(path))
    return model
