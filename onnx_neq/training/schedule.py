"""Learning rate per iteration: linear warm-up from 0, then cosine to 0 (the paper's recipe)."""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """lr at iteration `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup_steps) / span))
