"""Which neurons train next epoch: plain numpy functions, no ONNX (docs/ALGORITHM.md, "Selection", "Budgets").

All work on flat arrays over every neuron of the model (manifest layer order) and return a
boolean mask: True = train this neuron's channel. The budget bounds the sum of costs of the
selected neurons.
"""

from __future__ import annotations

import numpy as np


def velocity_ranking(velocity: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Neurons by |velocity| / cost, descending (ties in index order)."""
    return np.argsort(-(np.abs(velocity) / costs), kind="stable")


def select_full(costs: np.ndarray) -> np.ndarray:
    return np.ones(len(costs), bool)


def select_neq(velocity: np.ndarray, eps: float) -> np.ndarray:
    """NEq threshold mode: train the neurons whose |velocity| exceeds eps; no budget."""
    return np.abs(velocity) > eps


def select_scotti(velocity: np.ndarray, eps: float) -> np.ndarray:
    """SCoTTi's freeze (its authors' rule): train the neurons with |velocity| - eps >= 0."""
    return np.abs(velocity) - eps >= 0


def select_su(weight_norms: list[np.ndarray], scheme: dict[int, float]) -> np.ndarray:
    """Static Sparse Update: in each listed layer (by index) keep the `ratio` of output channels
    with the largest weight L2 norm; every other layer frozen."""
    parts = []
    for index, norms in enumerate(weight_norms):
        keep = np.zeros(len(norms), bool)
        count = int(len(norms) * scheme.get(index, 0.0))
        keep[np.argsort(-norms, kind="stable")[:count]] = True
        parts.append(keep)
    return np.concatenate(parts)


# MobileNetV2 schemes of the WACV paper (docs/ALGORITHM.md, "su"): conv index -> ratio of channels.
SU_SCHEMES: dict[int, dict[int, float]] = {
    1: dict(zip([36, 39, 40, 41, 42, 45, 48, 49], [1, 1, 0, 0.25, 0.125, 0.125, 0.125, 0.125])),
    2: dict(zip([32, 33, 36, 39, 41, 42, 45, 48], [0.125, 0.5, 0.5, 1, 0.25, 0.125, 0.125, 1])),
    3: dict(zip([27, 30, 33, 36, 39, 42, 45, 48], [1, 1, 1, 1, 1, 0.125, 0.5, 1])),
    4: dict(zip([27, 30, 33, 36, 39, 42, 45, 48], [1, 1, 1, 1, 1, 0.5, 1, 1])),
    5: dict(zip([27, 30, 33, 36, 39, 42, 45, 48], [1, 1, 1, 1, 1, 1, 1, 1])),
}


def split_by_layer(selected: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Cut a flat neuron mask into per-layer float32 masks."""
    return [part.astype(np.float32) for part in np.split(selected, np.cumsum(sizes)[:-1])]
