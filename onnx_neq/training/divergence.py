"""Divergence checks: a run stops at the first non-finite loss, an exploding loss, or non-finite weights.

Exploding: an epoch's mean training loss above EXPLOSION_FACTOR times where the run started (the
loss of its first step, or ln K for K classes if that is larger: a fresh head starts near ln K).
Training that works never goes there; `--lr 10000` on the shipped model reaches 1e8 in its first epoch.
"""

from __future__ import annotations

import math

import numpy as np

from onnx_neq.errors import DivergedError

EXPLOSION_FACTOR = 10.0


class DivergenceGuard:
    def __init__(self, reference_loss: float | None, num_classes: int):
        self.reference = reference_loss
        self.floor = math.log(max(num_classes, 2))

    def step(self, epoch: int, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise DivergedError(f"training diverged in epoch {epoch}: the loss became {loss} at step {step}")
        if self.reference is None:
            self.reference = float(loss)

    def epoch(self, epoch: int, mean_loss: float) -> None:
        limit = EXPLOSION_FACTOR * max(self.reference or 0.0, self.floor)
        if mean_loss > limit:
            raise DivergedError(
                f"training diverged in epoch {epoch}: mean loss {mean_loss:.4g}, over {EXPLOSION_FACTOR:g}x the starting {max(self.reference or 0.0, self.floor):.3g}"
            )

    @staticmethod
    def weights(epoch: int, parameters: dict[str, np.ndarray]) -> None:
        bad = non_finite(parameters)
        if bad:
            raise DivergedError(
                f"training diverged in epoch {epoch}: non-finite weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
            )


def non_finite(parameters: dict[str, np.ndarray]) -> list[str]:
    return [name for name, value in parameters.items() if not np.all(np.isfinite(value))]
