"""SCoTTi: NEq's freezing with a learned threshold, learning rate and momentum (docs/ALGORITHM.md, "SCoTTi").

Li, Tartaglione, Nguyen, "SCoTTi: Save Computation at Training Time with an adaptive framework" (ICCV-W
2023), after the authors' optimizer (optim/optimSCoTTi.py) and "Gradient Descent: The Ultimate Optimizer".
Three global scalars are learned every iteration by their hyper-gradients: the learning rate alpha, the
momentum mu of heavy-ball SGD and the freezing threshold eps. A neuron (conv output channel) trains in an
iteration while |v| - eps >= 0, v its velocity of the last epoch (fixed within the epoch).

Per iteration t, with g the loss gradient of the step and b the momentum buffer of the previous update:

    hyper-step    G_alpha = -sum g . b          (every trained parameter)
                  G_mu    = -alpha * sum g . d   (d = db/dmu of the previous update: its b before, frozen rows 0)
                  G_eps   = +alpha * sum g . b   (the weights of masked convs: the straight-through freeze)
                  h = 0.9 h + G;  x -= kappa * h       for x in alpha, mu (kappa = hyper_lr) and eps (eps_hyper_lr)
    freeze        m = 1[|v| - eps >= 0] per output channel (no velocity yet, the warm-up epoch: every channel)
    base step     g' = g + wd * theta;  b = mu * b + g';  b[frozen] = 0;  theta[trained] -= alpha * b

Plain numpy; the backends call it (backends/base.py, UpdateRule) with their gradients, each given as
(values, rows): the rows of the parameter they hold (None: every row). Frozen rows are never written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnx_neq.selection.selectors import select_scotti

F32 = np.float32
HYPER_MOMENTUM = 0.9  # the heavy-ball momentum of the hyper-parameters' own SGD (the authors' code)
HYPER = ("lr", "momentum", "eps")  # the learned scalars, as hyper.csv and the run state name them

Grads = Mapping[str, tuple[np.ndarray, np.ndarray | None]]  # parameter -> (gradient of `rows`, rows or None: all)


@dataclass
class ScottiSettings:
    lr: float = 0.1  # alpha_0
    momentum: float = 0.9  # mu_0
    eps: float = 0.05  # eps_0
    hyper_lr: float = 1e-4  # kappa of alpha and mu
    eps_hyper_lr: float = 1e-4  # kappa of eps
    weight_decay: float = 1e-3


class Scotti:
    """The update rule; `bind` it to the parameters first, `set_velocity` each epoch, then per step
    `prepare(grads)` (the hyper-step; returns the channel masks of the update) and `step(params, grads)`."""

    def __init__(self, settings: ScottiSettings):
        self.settings = settings
        self.values = {"lr": settings.lr, "momentum": settings.momentum, "eps": settings.eps}
        self.h = dict.fromkeys(HYPER, 0.0)
        self.buffers: dict[str, np.ndarray] = {}  # b
        self.mu_grads: dict[str, np.ndarray] = {}  # d = db/dmu of the last update
        self.velocity: dict[str, np.ndarray] | None = None  # |v| per layer; None: nothing freezes
        self.param_layers: dict[str, str] = {}
        self.ste: set[str] = set()
        self.layer_sizes: dict[str, int] = {}
        self.masks: dict[str, np.ndarray] = {}

    def bind(self, param_layers: dict[str, str], ste: set[str], layer_sizes: dict[str, int]) -> None:
        """`param_layers`: each parameter that freezes with a layer's channels (rows = channels) -> the layer;
        `ste`: those whose update carries the straight-through freeze (conv weights); `layer_sizes`: channels per layer."""
        self.param_layers, self.ste, self.layer_sizes = dict(param_layers), set(ste), dict(layer_sizes)
        self.masks = self.freeze_masks()

    def set_velocity(self, velocity: dict[str, np.ndarray] | None) -> None:
        """The velocity of the epoch per layer (None: the warm-up, every channel trains and eps does not learn)."""
        self.velocity = None if velocity is None else {k: np.abs(np.asarray(v, np.float64)) for k, v in velocity.items()}

    @property
    def lr(self) -> float:
        return self.values["lr"]

    def freeze_masks(self, eps: float | None = None) -> dict[str, np.ndarray]:
        """Per layer, bool per channel: |v| - eps >= 0 (train); every channel without a velocity."""
        eps = self.values["eps"] if eps is None else eps
        if self.velocity is None:
            return {name: np.ones(n, bool) for name, n in self.layer_sizes.items()}
        return {name: select_scotti(self.velocity[name], eps) for name in self.layer_sizes}

    def frozen_share(self) -> float:
        total = sum(self.layer_sizes.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / max(1, total)

    # per step -----------------------------------------------------------------------------------
    def prepare(self, grads: Grads) -> dict[str, np.ndarray]:
        """Learn alpha, mu and eps from this step's gradients; returns the channel masks of this update."""
        dot_b = dot_ste = dot_d = 0.0
        for name, (g, rows) in grads.items():
            b = self.buffers.get(name)
            if b is None:
                continue
            along_b = _dot(g, b, rows)
            dot_b += along_b
            dot_d += _dot(g, self.mu_grads[name], rows)
            if name in self.ste:
                dot_ste += along_b
        alpha, s = self.values["lr"], self.settings
        gradients = {"lr": -dot_b, "momentum": -alpha * dot_d, "eps": alpha * dot_ste if self.velocity is not None else 0.0}
        kappas = {"lr": s.hyper_lr, "momentum": s.hyper_lr, "eps": s.eps_hyper_lr}
        for key in HYPER:
            self.h[key] = HYPER_MOMENTUM * self.h[key] + gradients[key]
            self.values[key] -= kappas[key] * self.h[key]
        self.masks = self.freeze_masks()
        return self.masks

    def step(self, params: dict[str, np.ndarray], grads: Grads) -> None:
        """The base step under the masks of the last prepare (hyper-step); `params` updated in place, frozen rows untouched."""
        lr, mu, wd = F32(self.values["lr"]), F32(self.values["momentum"]), F32(self.settings.weight_decay)
        for name in set(self.buffers) - set(grads):  # wholly frozen this step (no gradient computed)
            self.buffers[name][...] = 0
            self.mu_grads[name][...] = 0
        for name, (g, rows) in grads.items():
            theta = params[name]
            keep = self._keep(name, theta.shape[0])
            b = self.buffers.setdefault(name, np.zeros_like(theta))
            d = self.mu_grads.setdefault(name, np.zeros_like(theta))
            np.copyto(d, b)  # db/dmu = the previous buffer, frozen rows 0
            new = np.zeros_like(theta) if rows is not None else b
            target = slice(None) if rows is None else rows
            step = np.add(g, np.multiply(wd, theta[target]))
            np.add(np.multiply(mu, b[target]), step, out=step)
            new[target] = step
            if keep is not None:
                d[~keep] = 0
                new[~keep] = 0
                _check_covered(name, keep, rows)
            self.buffers[name] = new
            np.subtract(theta, np.multiply(lr, new), out=theta, where=_rows(keep, theta.ndim))

    def _keep(self, name: str, channels: int) -> np.ndarray | None:
        layer = self.param_layers.get(name)
        if layer is None:
            return None
        keep = self.masks[layer]
        if keep.shape != (channels,):
            raise ValueError(f"{name}: {channels} rows but layer {layer} has {keep.size} channels")
        return keep

    # run state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"value/{k}": np.float64(v) for k, v in self.values.items()}
        state.update({f"h/{k}": np.float64(v) for k, v in self.h.items()})
        state.update({f"b/{k}": v for k, v in self.buffers.items()})
        state.update({f"d/{k}": v for k, v in self.mu_grads.items()})
        return {k: np.asarray(v) for k, v in state.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        for key in HYPER:
            self.values[key] = float(state[f"value/{key}"])
            self.h[key] = float(state[f"h/{key}"])
        self.buffers = {k[2:]: np.array(v, F32) for k, v in state.items() if k.startswith("b/")}
        self.mu_grads = {k[2:]: np.array(v, F32) for k, v in state.items() if k.startswith("d/")}
        self.masks = self.freeze_masks()


def _dot(g: np.ndarray, full: np.ndarray, rows: np.ndarray | None) -> float:
    """sum g . full[rows], accumulated in float64."""
    other = full if rows is None else full[rows]
    return float(np.multiply(g, other, dtype=np.float64).sum())


def _rows(keep: np.ndarray | None, ndim: int) -> bool | np.ndarray:
    return True if keep is None else keep.reshape((-1,) + (1,) * (ndim - 1))


def _check_covered(name: str, keep: np.ndarray, rows: np.ndarray | None) -> None:
    """Every trained row has a gradient (the backend recomputes the step when the masks widen)."""
    if rows is not None and np.count_nonzero(keep) > np.count_nonzero(keep[rows]):
        raise ValueError(f"{name}: the update trains rows that have no gradient")


def covers(computed: Mapping[str, np.ndarray], wanted: Mapping[str, np.ndarray]) -> bool:
    """True when every channel `wanted` (per layer, bool or 0/1) is among those `computed`."""
    return all(not np.any((np.asarray(w) != 0) & (np.asarray(computed[k]) == 0)) for k, w in wanted.items())
