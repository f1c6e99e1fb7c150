"""Entropy-Guided Pruning (EGP) and its global magnitude-pruning baseline, in numpy.

Liao, Quetu, Nguyen, Tartaglione, "Can Unstructured Pruning Reduce the Depth in Deep Neural Networks?"
(ICCV-W 2023), after the authors' code (src/main.py). Unstructured pruning that empties the layers whose
activation carries little information first, so that whole layers become removable.

Entropy. A neuron is a channel of an activation's input x, shape (N, C, ...) channels first, positions
pooled. Over one batch of training data (model in eval mode) a channel is ON where x > 0:

    p_c     = mean over samples and positions of 1[x > 0]
    K       = {c : 0 < p_c < 1}
    H_batch = mean over c in K of  -p_c log2 p_c - (1 - p_c) log2 (1 - p_c)     (bits; 0 when K is empty)
    H_l     = mean over batches of H_batch

The threshold is 0: for another activation the caller passes x minus its threshold (x - lo for a Clip or
ReLU6 with lower bound lo). The authors clamp p at 1e-5 inside the logarithms; since K excludes p = 0 and
p = 1 the exact formula is used here. A layer is removable when each channel is ON for every sample and
position of every batch, or OFF for all of them (H_l = 0 alone does not imply it: a channel may be all ON
in one batch and all OFF in the next).

Schedule. Each round prunes a share (0.5) of the remaining non-zero weights of the eligible layers:
P = floor(share * nnz); the sparsity after i rounds is 1 - (1 - share)^i.

EGP split of P over the layers L = {l : H_l != 0 and nnz_l > 0} (nnz_l: kept weights of layer l):

    I_l = H_l * mean |w_l| over its kept weights;  T = sum over the pool of I_l;  pool = L
    repeat  r_l = T / I_l;  s = softmax(r - max r) over the pool;  a_l = P * s_l
            every l with a_l > nnz_l: a_l = nnz_l, leaves the pool, P -= nnz_l, T -= I_l
    until no layer is capped (or the pool is empty)

A small I_l gives a large r_l and so the largest share: low-entropy layers empty first. The a_l are made
integers by the largest-remainder rule (our choice; the authors truncate each a_l): floor every a_l, then
give the units lost to flooring, one each, to the pool layers with the largest fractional parts (ties in
layer order), so that the amounts sum to exactly min(P, sum of nnz_l over L). Each layer then prunes its
a_l smallest |w| among its kept weights. The baseline prunes the P smallest |w| over the kept weights of
all layers together (one global threshold). Both return new keep-masks; a pruned weight never revives and
the weights themselves are never modified (a kept weight counts as non-zero: the mask is the record).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

TIE_TOLERANCE = 1e-9  # rounds_for: a schedule sparsity within this of the target reaches it


# entropy -----------------------------------------------------------------------------------------
def on_fraction(x: np.ndarray) -> np.ndarray:
    """p_c = mean over samples and positions of 1[x > 0] for x of shape (N, C, ...); float64 (C,)."""
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, ...) array, got shape {x.shape}")
    on = np.moveaxis(x > 0, 1, 0).reshape(x.shape[1], -1)
    return on.mean(axis=1, dtype=np.float64)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """-p log2 p - (1 - p) log2 (1 - p) elementwise, for 0 < p < 1."""
    p = np.asarray(p, np.float64)
    return -p * np.log2(p) - (1 - p) * np.log2(1 - p)


def batch_entropy(p: np.ndarray) -> float:
    """H_batch: mean binary entropy (bits) over the channels with 0 < p_c < 1; 0.0 when there are none."""
    p = np.asarray(p, np.float64)
    mixed = p[(p > 0) & (p < 1)]
    return float(binary_entropy(mixed).mean()) if mixed.size else 0.0


class LayerEntropy:
    """The entropy of one layer accumulated over batches: `add(x)` per batch (or `add_fraction(p)` with p
    already computed); `value` = H_l, the mean of H_batch so far (0.0 before any batch)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.batches = 0
        self.always_on: np.ndarray | None = None  # per channel: p_c == 1 in every batch so far
        self.always_off: np.ndarray | None = None  # per channel: p_c == 0 in every batch so far

    def add(self, x: np.ndarray) -> float:
        """Add one batch of the activation's input (threshold 0); returns its H_batch."""
        return self.add_fraction(on_fraction(x))

    def add_fraction(self, p: np.ndarray) -> float:
        """Add one batch given its p per channel; returns its H_batch."""
        p = np.asarray(p, np.float64)
        if self.always_on is None:
            self.always_on, self.always_off = np.ones(p.shape, bool), np.ones(p.shape, bool)
        elif p.shape != self.always_on.shape:
            raise ValueError(f"{p.shape[0] if p.ndim else 0} channels, earlier batches had {self.always_on.size}")
        self.always_on &= p == 1
        self.always_off &= p == 0
        h = batch_entropy(p)
        self.total += h
        self.batches += 1
        return h

    @property
    def value(self) -> float:
        return self.total / self.batches if self.batches else 0.0

    @property
    def removable(self) -> bool:
        """Every channel always ON or always OFF over all batches seen (False before any batch)."""
        return self.always_on is not None and bool(np.all(self.always_on | self.always_off))


def removable(layer: LayerEntropy) -> bool:
    """True when every channel of the layer was always ON or always OFF (zero entropy over the data)."""
    return layer.removable


# schedule ----------------------------------------------------------------------------------------
def _check_share(share: float) -> None:
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")


def round_amount(nonzero_total: int, share: float = 0.5) -> int:
    """P = floor(share * nonzero_total): the weights one round prunes."""
    _check_share(share)
    if nonzero_total < 0:
        raise ValueError("nonzero_total must be >= 0")
    return int(share * nonzero_total)


def schedule_sparsity(rounds: int, share: float = 0.5) -> list[float]:
    """Sparsity after rounds 1..rounds: 1 - (1 - share)^i."""
    _check_share(share)
    if rounds < 0:
        raise ValueError("rounds must be >= 0")
    return [1 - (1 - share) ** i for i in range(1, rounds + 1)]


def rounds_for(sparsity: float, share: float = 0.5) -> int:
    """The smallest i >= 0 with 1 - (1 - share)^i >= sparsity - 1e-9; sparsity in [0, 1)."""
    _check_share(share)
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    i = 0
    while 1 - (1 - share) ** i < sparsity - TIE_TOLERANCE:
        i += 1
    return i


# per-layer pruning -------------------------------------------------------------------------------
def layer_stats(weights: np.ndarray, mask: np.ndarray) -> tuple[int, float]:
    """(nnz, mean |w| over the kept weights) of one layer; mean 0.0 when nothing is kept."""
    kept = np.abs(np.asarray(weights, np.float64)[_mask(weights, mask)])
    return int(kept.size), float(kept.mean()) if kept.size else 0.0


def egp_amounts(amount: int, entropy: np.ndarray, mean_abs: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    """The EGP split of `amount` weights over the layers (int64 per layer; see the module docstring).
    Layers with entropy 0 or no kept weights get 0; the result sums to min(amount, eligible nnz)."""
    entropy, mean_abs = np.asarray(entropy, np.float64), np.asarray(mean_abs, np.float64)
    nonzero = np.asarray(nonzero, np.int64)
    if not entropy.shape == mean_abs.shape == nonzero.shape or entropy.ndim != 1:
        raise ValueError("entropy, mean_abs and nonzero must be 1-D arrays of one length")
    if amount < 0 or np.any(entropy < 0) or np.any(nonzero < 0):
        raise ValueError("amount, entropy and nonzero must be >= 0")
    eligible = (entropy != 0) & (nonzero > 0)
    if np.any(mean_abs[eligible] <= 0):
        raise ValueError("an eligible layer needs mean |w| > 0 over its non-zero weights")
    importance = entropy * mean_abs
    result = np.zeros(len(entropy), np.float64)
    pool, budget = np.flatnonzero(eligible), float(amount)
    while pool.size:
        r = importance[pool].sum() / importance[pool]  # T / I_l (T recomputed over the pool: T minus the I_l that left)
        e = np.exp(r - r.max())
        share = budget * e / e.sum()
        capped = share > nonzero[pool]
        if not capped.any():
            result[pool] = share
            break
        result[pool[capped]] = nonzero[pool[capped]]
        budget -= float(nonzero[pool[capped]].sum())
        pool = pool[~capped]
    return _largest_remainder(result, pool, min(amount, int(nonzero[eligible].sum())), nonzero)


def _largest_remainder(amounts: np.ndarray, pool: np.ndarray, target: int, nonzero: np.ndarray) -> np.ndarray:
    """Floor `amounts`; the units short of `target` go to the `pool` layers by largest fractional part."""
    whole = np.floor(amounts).astype(np.int64)
    short = target - int(whole.sum())
    fractions = amounts[pool] - whole[pool]
    for index in pool[np.argsort(-fractions, kind="stable")]:
        if short <= 0:
            break
        if whole[index] < nonzero[index]:
            whole[index] += 1
            short -= 1
    return whole


def prune_smallest(weights: np.ndarray, mask: np.ndarray, amount: int) -> np.ndarray:
    """New keep-mask: the `amount` smallest |w| among the kept weights set False (ties in flat index
    order; amount clipped to the kept count). Pruned weights stay pruned."""
    keep = _mask(weights, mask).copy()
    if amount < 0:
        raise ValueError("amount must be >= 0")
    kept = np.flatnonzero(keep)
    order = np.argsort(np.abs(np.asarray(weights).reshape(-1)[kept]), kind="stable")
    keep.reshape(-1)[kept[order[:amount]]] = False
    return keep


def egp_masks(
    weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], entropy: Mapping[str, float], amount: int
) -> dict[str, np.ndarray]:
    """One EGP round: split `amount` by `egp_amounts` (H_l from `entropy`, nnz and mean |w| from the masks),
    then `prune_smallest` in each layer. Returns new masks for every layer of `weights`."""
    names = list(weights)
    stats = [layer_stats(weights[n], masks[n]) for n in names]
    nonzero = np.array([s[0] for s in stats], np.int64)
    mean_abs = np.array([s[1] for s in stats], np.float64)
    amounts = egp_amounts(amount, np.array([entropy[n] for n in names], np.float64), mean_abs, nonzero)
    return {n: prune_smallest(weights[n], masks[n], int(a)) for n, a in zip(names, amounts)}


# baseline ----------------------------------------------------------------------------------------
def magnitude_masks(weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], amount: int) -> dict[str, np.ndarray]:
    """Global magnitude pruning: the `amount` smallest |w| among the kept weights of all layers set False
    (ties in layer order, then flat index; amount clipped to the kept count). Returns new masks."""
    if amount < 0:
        raise ValueError("amount must be >= 0")
    names = list(weights)
    keeps = {n: _mask(weights[n], masks[n]).copy() for n in names}
    kept = [np.flatnonzero(keeps[n]) for n in names]
    values = np.concatenate([np.abs(np.asarray(weights[n], np.float64).reshape(-1)[k]) for n, k in zip(names, kept)] + [np.zeros(0)])
    layer = np.concatenate([np.full(len(k), i) for i, k in enumerate(kept)] + [np.zeros(0, np.int64)]).astype(np.int64)
    flat = np.concatenate(kept + [np.zeros(0, np.int64)])
    chosen = np.argsort(values, kind="stable")[:amount]
    for i, n in enumerate(names):
        keeps[n].reshape(-1)[flat[chosen[layer[chosen] == i]]] = False
    return keeps


def sparsity(masks: Mapping[str, np.ndarray]) -> float:
    """Share of pruned (False) entries over all masks; 0.0 for no entries."""
    total = sum(np.asarray(m).size for m in masks.values())
    pruned = sum(np.asarray(m).size - int(np.count_nonzero(m)) for m in masks.values())
    return pruned / total if total else 0.0


def _mask(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, bool)
    if mask.shape != np.shape(weights):
        raise ValueError(f"mask shape {mask.shape} differs from weights {np.shape(weights)}")
    return mask
