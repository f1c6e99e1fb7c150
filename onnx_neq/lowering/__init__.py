"""Portable training models: ORT's training graph rewritten into standard ONNX (opset 17) for stock onnxruntime."""

from .lower import LoweringReport, lower_training_model
from .rules import RULES

__all__ = ["RULES", "LoweringReport", "lower_training_model"]
