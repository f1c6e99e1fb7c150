"""Neuron velocity from NEq, in numpy (docs/ALGORITHM.md, "phi" and "Velocity").

spatial (default): phi_t[c] = mean_n (1 - cos(y_t[n, c, :], y_{t-1}[n, c, :]))   cosine over positions
flat:              phi_t[c] = 1 - cos(y_t[:, c, :], y_{t-1}[:, c, :])             over images and positions
code recurrence (default, the authors' code; mu = 0.5, buffers start at 0):
    d_t = phi_{t-1} - phi_t  (phi_{-1} = 0);  r_t = s_{t-1} + d_t;  s_t = mu * r_t - d_t;  velocity = r_t
textbook recurrence (the slides): v_t = (phi_t - phi_{t-1}) - mu * v_{t-1}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RECURRENCES = ("code", "textbook")
PHI_MODES = ("spatial", "flat")


def cosine_distance(current: np.ndarray, previous: np.ndarray, mode: str = "spatial") -> np.ndarray:
    """phi per channel of (N, C, ...) raw conv outputs. spatial: mean over samples of 1 - cos over
    positions (at 1x1 maps each cosine is the sign of one product); flat: 1 - cos of the channel's
    outputs over all samples and positions as one vector. Both vectors zero -> cos 1; one zero -> cos 0.
    """
    if mode not in PHI_MODES:
        raise ValueError(f"phi must be one of {PHI_MODES}")
    n, c = current.shape[:2]
    if mode == "flat":  # (N, C, S) -> (1, C, N*S)
        current, previous = (np.moveaxis(t.reshape(n, c, -1), 0, 1).reshape(1, c, -1) for t in (current, previous))
    a = current.reshape(current.shape[0], c, -1).astype(np.float64)
    b = previous.reshape(previous.shape[0], c, -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=2), np.linalg.norm(b, axis=2)
    dot = np.einsum("ncs,ncs->nc", a, b)
    both_zero, one_zero = (na == 0) & (nb == 0), (na == 0) ^ (nb == 0)
    cos = np.divide(dot, na * nb, out=np.zeros_like(dot), where=(na > 0) & (nb > 0))
    cos = np.where(both_zero, 1.0, np.where(one_zero, 0.0, np.clip(cos, -1.0, 1.0)))
    return (1.0 - cos).mean(axis=0)


@dataclass
class VelocityState:
    """The per-neuron buffers carried from epoch to epoch (flat over all layers)."""

    neurons: int
    mu: float = 0.5
    recurrence: str = "code"
    phi: np.ndarray = field(default=None)  # phi_{t-1}
    buffer: np.ndarray = field(default=None)  # s_{t-1} (code) or v_{t-1} (textbook)
    velocity: np.ndarray | None = None  # the latest r_t / v_t
    steps: int = 0

    def __post_init__(self) -> None:
        if self.recurrence not in RECURRENCES:
            raise ValueError(f"recurrence must be one of {RECURRENCES}")
        self.phi = np.zeros(self.neurons) if self.phi is None else self.phi
        self.buffer = np.zeros(self.neurons) if self.buffer is None else self.buffer

    def update(self, phi: np.ndarray) -> np.ndarray:
        """Feed this epoch's phi; returns the velocity used for selection."""
        if self.recurrence == "code":
            d = self.phi - phi
            r = self.buffer + d
            self.buffer = self.mu * r - d
            self.velocity = r
        else:
            self.velocity = (phi - self.phi) - self.mu * self.buffer
            self.buffer = self.velocity
        self.phi = phi
        self.steps += 1
        return self.velocity

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"phi": self.phi, "buffer": self.buffer, "steps": np.array(self.steps)}
        if self.velocity is not None:
            arrays["velocity"] = self.velocity
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], mu: float, recurrence: str) -> VelocityState:
        velocity = arrays["velocity"] if "velocity" in arrays else None
        return cls(len(arrays["phi"]), mu, recurrence, arrays["phi"], arrays["buffer"], velocity, int(arrays["steps"]))


def layer_phi(current: dict[str, np.ndarray], previous: dict[str, np.ndarray], order: list[str], mode: str = "spatial") -> np.ndarray:
    """phi for all neurons, concatenated in manifest layer order."""
    return np.concatenate([cosine_distance(current[name], previous[name], mode) for name in order])
