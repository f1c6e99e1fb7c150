"""Inference models: no Dropout, BatchNorm in inference mode, no masks, no taps."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from .passes.batchnorm_inference import BatchNormInferencePass
from .passes.dropout_removal import DropoutRemovalPass


def to_inference_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The forward graph of a training-mode export, as ONNX Runtime inference runs it."""
    ir_model = ir.serde.deserialize_model(model)
    ir.passes.Sequential(BatchNormInferencePass(), DropoutRemovalPass())(ir_model)
    return ir.serde.serialize_model(ir_model)
