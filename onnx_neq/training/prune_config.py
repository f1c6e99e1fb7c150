"""`onnx-neq prune`'s settings: train's (TrainConfig) and its own, declared as TrainConfig declares them."""

from __future__ import annotations

from dataclasses import dataclass

from onnx_neq.training.config import PRUNE, TrainConfig, setting

EGP, MAGNITUDE = METHODS = ("egp", "magnitude")


@dataclass
class PruneConfig(TrainConfig):
    model: str = setting("", "The ONNX model to prune.")
    sparsity: float = setting(
        0.9, "Target share of zero weights in the prunable convs (those an activation follows).", cli=PRUNE, above=0, below=1
    )
    method: str = setting(
        EGP, "egp: per-layer amounts from the activations' entropy; magnitude: one global threshold.", cli=PRUNE, choices=METHODS
    )
    share: float = setting(
        0.5, "Share of the remaining prunable weights each round prunes (the authors' 0.5).", cli=PRUNE, above=0, maximum=1
    )
