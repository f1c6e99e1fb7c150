"""Fine-tuning between pruning rounds: every channel trains, and pruned weights are never written.

PrunePolicy hands the backend an update rule (backends/base.py UpdateRule) that is SGD as the artifacts'
optimizer, w = w + (-lr * g), applied only where the weight's keep-mask is True: a pruned weight stays
exactly the zero it was set to before the round, by the update itself rather than a re-zeroing after it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnx_neq.backends.update_rules import Grads, attach_rule
from onnx_neq.manifest import Manifest
from onnx_neq.training.config import TrainConfig
from onnx_neq.training.loop import Policy, Step, TrainingLoop
from onnx_neq.training.setup import Selection

F32 = np.float32


class WeightMaskedSGD:
    """SGD whose update skips the pruned weights (`keep`: weight name -> bool array of its shape)."""

    def __init__(self, keep: dict[str, np.ndarray]):
        self.keep = keep
        self.lr = 0.0
        self.all: dict[str, np.ndarray] = {}

    def bind(self, param_layers: dict[str, str], ste: set[str], layer_sizes: dict[str, int]) -> None:
        self.all = {name: np.ones(n, bool) for name, n in layer_sizes.items()}

    def prepare(self, grads: Grads) -> dict[str, np.ndarray]:
        return self.all  # every channel trains

    def step(self, params: dict[str, np.ndarray], grads: Grads) -> None:
        lr = F32(self.lr)
        for name, (g, rows) in grads.items():
            w = params[name]
            target = slice(None) if rows is None else rows
            updated = np.add(w[target], np.multiply(-lr, g))  # sgd.cc: w + (-lr * g)
            keep = self.keep.get(name)
            w[target] = updated if keep is None else np.where(keep[target], updated, w[target])


class PrunePolicy(Policy):
    """Every neuron trains every epoch under WeightMaskedSGD with the schedule's learning rate."""

    def __init__(self, config: TrainConfig, manifest: Manifest, selection: Selection, keep: dict[str, np.ndarray]):
        self.rule = WeightMaskedSGD(keep)

    def start(self, loop: TrainingLoop, saved: dict[str, np.ndarray]) -> None:
        super().start(loop, saved)
        attach_rule(loop.session, self.rule)

    def before_step(self, step: Step) -> None:
        self.rule.lr = step.lr


def read_keep(path: Path) -> dict[str, np.ndarray]:
    """A round's keep-masks (weight name -> bool array) from its masks.npz."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k].astype(bool) for k in z.files}
