"""Gradient-driven neuron selectors, plain numpy, no ONNX (docs/ALGORITHM.md, "gradnorm" and "fisher").

Like selectors.py, every function works on flat arrays over all neurons (manifest layer order). Each
returns the order in which channels are drawn; the registry fills it to the budget with cost_model.greedy_fill.

gradnorm_order  MeDyate-style: sample channels in proportion to their running gradient norm (RunningNorm,
                fed from gradient_stats.ChannelStats.grad_norm); channels never trained yet get the largest
                norm seen, and the draw can be limited to the layers with the largest gradient norm per
                parameter.
fisher_order    TinyTrain-style: sample channels in proportion to their Fisher potential per parameter
                (ChannelStats.fisher / cost).

Sampling without replacement in proportion to weights w uses the Efraimidis-Spirakis key trick in its
exponential form: each channel gets the key E_i / w_i with E_i ~ Exp(1), and channels are drawn in
ascending key order. This is an exponential race: the first channel is i with probability w_i / sum(w),
and by memorylessness each next one is drawn from the rest in proportion to w (successive sampling,
the law of rng.choice(n, n, replace=False, p=w/sum(w))), at the cost of one sort. The draw order is
then filled greedily up to the budget: a channel that does not fit is skipped and the walk goes on
(backfill), so cheaper channels later in the order still use the rest of the budget.
"""

from __future__ import annotations

import numpy as np

from onnx_neq.errors import NeqError

DEFAULT_DECAY = 0.5


def gradnorm_order(
    norms: np.ndarray,
    trained_ever: np.ndarray,
    costs: np.ndarray,
    rng: np.random.Generator,
    first_epoch: bool = False,
    layer_sizes: list[int] | np.ndarray | None = None,
    pool_layers: int | None = None,
) -> np.ndarray:
    """Channels drawn without replacement with probability proportional to w (the order a budget is filled in).

    w is the running gradient norm of each channel; channels with trained_ever False get the largest norm
    among the channels trained before. first_epoch, no channel trained yet, or every trained channel's norm 0:
    w = 1 for every channel and no pool (there is no gradient information to rank layers by).

    pool_layers (needs layer_sizes, the channels of each layer in order): only the pool_layers layers with
    the largest gradient norm per parameter, sqrt(sum of the layer's squared channel weights w) / the layer's
    parameters (sum of its channel costs), can be selected (ties: the earlier layer). Inside the allowed
    channels, those with w = 0 come after all positive ones, in random order.
    """
    costs = _costs(costs)
    n = len(costs)
    norms = _finite("gradient norms", norms, n)
    trained_ever = np.asarray(trained_ever, bool)
    if trained_ever.shape != (n,):
        raise NeqError(f"trained_ever has shape {list(trained_ever.shape)}, expected [{n}] (one flag per neuron)")
    weights = np.ones(n)
    informed = not first_epoch and trained_ever.any() and norms[trained_ever].max() > 0
    if informed:
        weights = norms.copy()
        weights[~trained_ever] = norms[trained_ever].max()
    allowed = np.ones(n, bool)
    if pool_layers is not None:
        sizes = _pool_checked(costs, layer_sizes, pool_layers)
        if informed:
            allowed = _pool(weights, costs, sizes, pool_layers)
    return _weighted_order(weights, allowed, rng)


def fisher_order(fisher: np.ndarray, costs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """score = fisher / cost; channels drawn without replacement with probability proportional to the score
    (zero-score channels after every positive one, in random order)."""
    costs = _costs(costs)
    scores = _finite("Fisher potentials", fisher, len(costs)) / costs
    return _weighted_order(scores, np.ones(len(costs), bool), rng)


class RunningNorm:
    """A per-channel running gradient norm across epochs, and which channels were ever trained.

    update(norms): norm <- decay * norm + (1 - decay) * norms (an exponential moving average; a channel's
    first measurement is taken as is). The default decay 0.5 halves the weight of a measurement every
    epoch: the newest epoch counts 1/2, the one before 1/4, and so on. Only channels flagged in `measured`
    (default: all) are updated. mark_trained(selected) records each epoch's selection in trained_ever.
    to_arrays()/from_arrays() checkpoint the state as numpy arrays, exactly (a resumed run continues
    bit-identically).
    """

    def __init__(self, neurons: int, decay: float = DEFAULT_DECAY):
        if not 0.0 <= decay < 1.0:
            raise NeqError(f"the running-norm decay must be in [0, 1), not {decay}")
        self.decay = float(decay)
        self.norm = np.zeros(neurons, np.float64)
        self.measured = np.zeros(neurons, bool)
        self.trained_ever = np.zeros(neurons, bool)

    def update(self, norms: np.ndarray, measured: np.ndarray | None = None) -> None:
        """Fold one epoch's per-channel norms (e.g. ChannelStats.grad_norm) into the running norm."""
        n = len(self.norm)
        norms = _finite("gradient norms", norms, n)
        mask = np.ones(n, bool) if measured is None else np.asarray(measured, bool)
        if mask.shape != (n,):
            raise NeqError(f"measured has shape {list(mask.shape)}, expected [{n}] (one flag per neuron)")
        old = mask & self.measured
        new = mask & ~self.measured
        self.norm[old] = self.decay * self.norm[old] + (1.0 - self.decay) * norms[old]
        self.norm[new] = norms[new]
        self.measured |= mask

    def mark_trained(self, selected: np.ndarray) -> None:
        selected = np.asarray(selected, bool)
        if selected.shape != self.trained_ever.shape:
            raise NeqError(f"selection has shape {list(selected.shape)}, expected [{len(self.trained_ever)}] (one flag per neuron)")
        self.trained_ever |= selected

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "norm": self.norm.copy(),
            "measured": self.measured.copy(),
            "trained_ever": self.trained_ever.copy(),
            "decay": np.array(self.decay, np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RunningNorm:
        missing = [k for k in ("norm", "measured", "trained_ever", "decay") if k not in arrays]
        if missing:
            raise NeqError(f"the running-norm state lacks {missing}; the checkpoint is incomplete, start the run again")
        norm = np.asarray(arrays["norm"], np.float64)
        state = cls(len(norm), float(arrays["decay"]))
        state.norm[:] = norm
        state.measured[:] = np.asarray(arrays["measured"], bool)
        state.trained_ever[:] = np.asarray(arrays["trained_ever"], bool)
        return state


# helpers ----------------------------------------------------------------------------------


def _costs(costs: np.ndarray) -> np.ndarray:
    costs = np.asarray(costs)
    if costs.ndim != 1 or not len(costs) or not np.all(costs > 0):
        raise NeqError("neuron costs must be a non-empty flat array of positive parameter counts")
    return costs


def _finite(what: str, values: np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if values.shape != (n,):
        raise NeqError(f"{what} have shape {list(values.shape)}, expected [{n}] (one per neuron)")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise NeqError(
            f"{what} contain negative or non-finite values (training diverged?); lower the learning rate or resume from an earlier epoch"
        )
    return values


def _weighted_order(weights: np.ndarray, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Allowed channels with weight > 0 in an exponential-race order (successive sampling in proportion to
    the weights), then the allowed ones with weight 0 in a random order."""
    positive = np.flatnonzero(allowed & (weights > 0))
    zero = np.flatnonzero(allowed & (weights <= 0))
    keys = rng.exponential(size=len(positive)) / weights[positive]
    return np.concatenate([positive[np.argsort(keys, kind="stable")], rng.permutation(zero)])


def _pool(weights: np.ndarray, costs: np.ndarray, sizes: np.ndarray, pool_layers: int) -> np.ndarray:
    """Channels of the pool_layers layers with the largest gradient norm per parameter."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    score = np.sqrt(np.add.reduceat(weights**2, starts)) / np.add.reduceat(costs.astype(np.float64), starts)
    top = np.argsort(-score, kind="stable")[: int(pool_layers)]
    layer_of = np.repeat(np.arange(len(sizes)), sizes)
    return np.isin(layer_of, top)


def _pool_checked(costs: np.ndarray, layer_sizes, pool_layers: int) -> np.ndarray:
    """layer_sizes as an array, or NeqError if it or pool_layers does not fit the neurons."""
    if layer_sizes is None:
        raise NeqError("a layer pool needs layer_sizes (the channels of each layer); pass the manifest layers' out_channels")
    sizes = np.asarray(layer_sizes, np.int64)
    if sizes.ndim != 1 or np.any(sizes <= 0) or sizes.sum() != len(costs):
        raise NeqError(f"layer_sizes must be positive channel counts summing to the {len(costs)} neurons")
    if int(pool_layers) < 1:
        raise NeqError(f"the layer pool must hold at least 1 layer, not {pool_layers}")
    return sizes
