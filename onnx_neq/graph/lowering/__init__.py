"""Portable training models: ORT's training graph rewritten into standard ONNX (opset 17) for stock onnxruntime."""

from onnx_neq.graph.lowering.lower import LoweringReport, lower_training_model
from onnx_neq.graph.lowering.rules import RULES

__all__ = ["RULES", "LoweringReport", "lower_training_model"]
