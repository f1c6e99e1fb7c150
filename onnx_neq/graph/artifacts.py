"""Write the training artifacts of a prepared forward model.

Always (onnx-neq's own gradient builder, stock onnxruntime): portable_training_model.onnx (loss, logits,
masked gradients, BatchNorm batch statistics), eval_model.onnx (+ activation taps, single-output
BatchNorm) and parameters.npz. Where onnxruntime-training is installed, also its artifacts for the
reference backend (`--backend ort-training`): training_model.onnx (+ gradient masks and statistics
outputs, named as in the portable graph), optimizer_model.onnx (SGD or AdamW) and checkpoint.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnx_neq.errors import NeqError, first_line, is_runtime_error
from onnx_neq.graph import pipelines
from onnx_neq.graph.conv_layers import ConvLayer
from onnx_neq.graph.gradients import build_eval_model, build_training_model
from onnx_neq.graph.parameters import ParameterGroups
from onnx_neq.graph.passes.activation_rewrites import REWRITTEN_OPS
from onnx_neq.graph.passes.activation_taps import ActivationTapPass
from onnx_neq.graph.passes.batchnorm_inference import BatchNormInferencePass
from onnx_neq.graph.passes.batchnorm_statistics import BatchNormStatisticsPass
from onnx_neq.ort_runtime import artifacts_module, captured_native_stderr, has_training

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
LABEL_INPUT = "labels"
PORTABLE_FILES = {
    "portable_training_model": "portable_training_model.onnx",
    "eval_model": "eval_model.onnx",
    "parameters": "parameters.npz",
}
ORT_FILES = {
    "training_model": "training_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
}
FILES = {**ORT_FILES, **PORTABLE_FILES}  # every file prepare may write


@dataclass
class ArtifactsReport:
    loss_output: str
    mask_inputs: list[str]
    taps: list[str]
    bn_nodes_fixed: int
    bn_stats: list[dict]
    files: dict[str, str] = field(default_factory=dict)  # the manifest's files: what was written
    ort_training: str = ""  # why the ORT-training artifacts are missing ("" when written)
    unreached: list[str] = field(default_factory=list)


def generate(
    model: onnx.ModelProto,
    groups: ParameterGroups,
    layers: list[ConvLayer],
    optimizer: str,
    directory: Path,
    logits: str,
    weight_decay: float = 0.0,
    bn_positions: dict[str, int] | None = None,
    ort_training: bool | None = None,
) -> ArtifactsReport:
    """Write the artifacts into `directory`. `bn_positions`: running_mean -> H*W of each training-mode
    BatchNorm (their statistics become outputs). `ort_training`: also write onnxruntime-training's
    artifacts (None: where it is installed)."""
    if optimizer not in OPTIMIZERS:
        raise NeqError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    if optimizer == "sgd" and weight_decay:
        raise NeqError("SGD here has no weight decay (as ORT's); use --optimizer adamw for --weight-decay")
    directory.mkdir(parents=True, exist_ok=True)
    training, grads = build_training_model(model, groups.trainable, groups.frozen, layers, logits, LABEL_INPUT, bn_positions)
    onnx.save(training, str(directory / PORTABLE_FILES["portable_training_model"]))
    eval_model = ir.serde.deserialize_model(build_eval_model(model, groups.trainable + groups.frozen, logits, LABEL_INPUT))
    reports = pipelines.run("eval", eval_model, layers=layers)
    bn, taps = reports[BatchNormInferencePass], reports[ActivationTapPass]
    ir.save(eval_model, str(directory / PORTABLE_FILES["eval_model"]))
    _write_parameters(model, groups.trainable + groups.frozen, directory / PORTABLE_FILES["parameters"])
    report = ArtifactsReport(grads.loss_output, grads.mask_inputs, list(taps.taps), bn.changed, grads.bn_stats, dict(PORTABLE_FILES))
    report.unreached = grads.unreached
    if ort_training is None:
        ort_training = has_training()
    report.ort_training = "onnxruntime-training is not installed" if not ort_training else ""
    if ort_training:
        try:
            _write_ort_artifacts(model, groups, layers, optimizer, weight_decay, directory, logits, bn_positions, report)
            report.files.update(ORT_FILES)
        except NeqError as exc:
            report.ort_training = str(exc)
    return report


def _write_parameters(model: onnx.ModelProto, names: list[str], path: Path) -> None:
    """Every parameter, trained and frozen, as the portable backends read them."""
    tensors = {t.name: t for t in model.graph.initializer}
    with open(path, "wb") as f:
        np.savez(f, **{name: numpy_helper.to_array(tensors[name]) for name in names})


def _write_ort_artifacts(model, groups, layers, optimizer, weight_decay, directory: Path, logits, bn_positions, report) -> None:
    """onnxruntime-training's training model (masks, statistics outputs), optimizer model and checkpoint.
    Its loss and statistics outputs take the portable graph's names, so one manifest serves both."""
    with tempfile.TemporaryDirectory() as tmp:
        ort_dir = Path(tmp)
        _generate_ort_artifacts(model, groups, _optimizer_block(optimizer, weight_decay), ort_dir, logits)
        user_inputs = [v.name for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
        reference = pipelines.passes("reference", layers=layers, user_inputs=user_inputs + [LABEL_INPUT], bn_positions=bn_positions)
        training, reports = _rewrite(ort_dir / ORT_FILES["training_model"], reference)
        stats = reports[BatchNormStatisticsPass]
        renames = {training.graph.outputs[0].name: report.loss_output}
        theirs = {s["running_mean"]: s for s in stats.stats}
        if set(theirs) != {s["running_mean"] for s in report.bn_stats}:
            raise NeqError("onnxruntime-training's graph has other training-mode BatchNorms than onnx-neq's")
        for ours in report.bn_stats:
            for key in ("batch_mean", "batch_inv_std"):
                renames[theirs[ours["running_mean"]][key]] = ours[key]
        _rename_values(training, renames)
        _order_statistics(training, [name for s in report.bn_stats for name in (s["batch_mean"], s["batch_inv_std"])])
        ir.save(training, str(directory / ORT_FILES["training_model"]))
        _match_input_order(directory / PORTABLE_FILES["eval_model"], ort_dir / PORTABLE_FILES["eval_model"])
        for key in ("optimizer_model", "checkpoint"):
            (ort_dir / ORT_FILES[key]).replace(directory / ORT_FILES[key])


def _match_input_order(ours: Path, theirs: Path) -> None:
    """Our eval model's inputs in the order of onnxruntime-training's own eval model: its Module feeds the
    parameters by position, so both backends can evaluate the one eval_model.onnx."""
    order = {v.name: i for i, v in enumerate(onnx.load(str(theirs), load_external_data=False).graph.input)}
    model = onnx.load(str(ours))
    inputs = sorted(model.graph.input, key=lambda v: order.get(v.name, len(order)))
    if [v.name for v in inputs] != [v.name for v in model.graph.input]:
        copies = [onnx.ValueInfoProto() for _ in inputs]
        for copy, v in zip(copies, inputs):
            copy.CopyFrom(v)
        del model.graph.input[:]
        model.graph.input.extend(copies)
        onnx.save(model, str(ours))


def _order_statistics(model: ir.Model, names: list[str]) -> None:
    """The statistics outputs (the ORT backend reads them by position) in the manifest's order."""
    outputs = model.graph.outputs
    by_name = {v.name: v for v in outputs[len(outputs) - len(names) :]}
    del outputs[len(outputs) - len(names) :]
    outputs.extend(by_name[n] for n in names)


def _rename_values(model: ir.Model, renames: dict[str, str]) -> None:
    taken = {v.name for node in model.graph for v in node.outputs} | {v.name for v in model.graph.inputs}
    for old, new in renames.items():
        if old == new:
            continue
        if new in taken:
            raise NeqError(f"onnxruntime-training's graph already has a value named {new!r}")
        for node in model.graph:
            for value in node.outputs:
                if value.name == old:
                    value.name = new


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


def _rewrite(path: Path, passes: list[ir.passes.PassBase]) -> tuple[ir.Model, dict]:
    """The model at `path` through `passes`, saved back: the model and the passes' reports by pass class."""
    model = ir.load(str(path))
    reports = pipelines.apply(passes, model)
    ir.save(model, str(path))
    return model, reports
