"""onnx-neq's gradient builder: forward graph -> standard-ONNX training graph, one rule per op (rules.py)."""

from .builder import GradientReport, build_eval_model, build_training_model
from .rules import RULES

__all__ = ["RULES", "GradientReport", "build_eval_model", "build_training_model"]
