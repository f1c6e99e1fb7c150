"""The graph passes by stage, in the order they run: the one registry of pass pipelines.

A stage is a tuple of factories; each makes its pass from the stage's options (or returns None when the
pass does not apply, e.g. no --num-classes). `passes(stage, **options)` builds them and `run(stage,
model, **options)` applies them in place and returns each pass's report by pass class. Adding a pass is
its file in passes/ plus one line here.

    forward         the model as it trains: a fresh head (--num-classes), no Dropout
    differentiable  after parameter grouping: ops without a gradient rule in exact differentiable forms
    eval            the eval graph: BatchNorm in inference mode, activation taps as outputs
    reference       onnxruntime-training's training graph: gradient masks, BatchNorm batch statistics out
    inference       an inference model from a training-mode export: BatchNorm in inference mode, no Dropout

(Normalization of third-party models, normalize.py, interleaves passes with checks that stop the run.)
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import onnx_ir as ir

from onnx_neq.graph.passes.activation_rewrites import ActivationRewritePass
from onnx_neq.graph.passes.activation_taps import ActivationTapPass
from onnx_neq.graph.passes.batchnorm_affine import BatchNormAffinePass
from onnx_neq.graph.passes.batchnorm_inference import BatchNormInferencePass
from onnx_neq.graph.passes.batchnorm_statistics import BatchNormStatisticsPass
from onnx_neq.graph.passes.classifier_head import ClassifierHeadPass
from onnx_neq.graph.passes.dropout_removal import DropoutRemovalPass
from onnx_neq.graph.passes.gradient_masks import GradientMaskPass

Factory = Callable[[SimpleNamespace], "ir.passes.PassBase | None"]

PIPELINES: dict[str, tuple[Factory, ...]] = {
    "forward": (
        lambda o: ClassifierHeadPass(o.num_classes, o.seed) if o.num_classes else None,
        lambda o: DropoutRemovalPass(),
    ),
    "differentiable": (
        lambda o: BatchNormAffinePass(),
        lambda o: ActivationRewritePass(),
    ),
    "eval": (
        lambda o: BatchNormInferencePass(),
        lambda o: ActivationTapPass(o.layers),
    ),
    "reference": (
        lambda o: GradientMaskPass(o.layers, o.user_inputs),
        lambda o: BatchNormStatisticsPass(o.bn_positions or {}),
    ),
    "inference": (
        lambda o: BatchNormInferencePass(),
        lambda o: DropoutRemovalPass(),
    ),
}


def passes(stage: str, **options: Any) -> list[ir.passes.PassBase]:
    """The passes of `stage`, made from `options` (those that do not apply left out)."""
    namespace = SimpleNamespace(**options)
    return [p for p in (make(namespace) for make in PIPELINES[stage]) if p is not None]


def apply(pass_list: list[ir.passes.PassBase], model: ir.Model) -> dict[type, Any]:
    """Each pass in turn, in place; their reports by pass class (None for a pass without one)."""
    return {type(p): getattr(p(model), "report", None) for p in pass_list}


def run(stage: str, model: ir.Model, **options: Any) -> dict[type, Any]:
    """The passes of `stage` on `model`, in place; their reports by pass class."""
    return apply(passes(stage, **options), model)
