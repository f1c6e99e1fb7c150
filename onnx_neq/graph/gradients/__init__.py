"""onnx-neq's gradient builder: forward graph -> standard-ONNX training graph, one rule per op (rules.py)."""

from onnx_neq.graph.gradients.builder import GradientReport, build_eval_model, build_training_model
from onnx_neq.graph.gradients.rules import RULES

__all__ = ["RULES", "GradientReport", "build_eval_model", "build_training_model"]
