"""The numpy core of federated fine-tuning: what a client sends after a round, and how the server merges it.

Each round every client starts from the global parameters, fine-tunes them on its own data under a channel
selection (per conv layer a 0/1 mask, one entry per output channel = per row of the layer's weight and bias, in
manifest layer order) and sends back only what it trained, a `ChannelUpdate`:

    rows      per parameter that trains with its layer's channels (conv weight and bias; BatchNorm parameters
              that train with their channel), when the layer has at least one selected channel: the selected
              channel indices (int32 [k]) and those rows of the parameter (float32 [k, ...]). A layer with no
              selected channel sends nothing.
    whole     the always-trained parameters (the classifier, BatchNorm parameters that train on their own), named
              by the caller, each whole (float32).
    examples  how many training examples the client used (> 0).

The payload is the arrays' bytes (`nbytes`): indices + rows + whole arrays. `dense_update` sends every parameter
whole (the FedAvg baseline).

The server checks each update against its global parameters (`check_update`) and drops the rejected ones; then
`aggregate` sets every row (channel) of every parameter to the mean of the values sent for that row, weighted by
the examples of the clients that sent it (only those); a whole parameter counts as every row sent. A row nobody
sent keeps its global value bit for bit. Sums in float64, results float32, inputs never written.

Plain numpy; the messages are carried by a transport (Flower) elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

F32 = np.float32
I32 = np.int32
CHANNELS, DENSE = SENDS = ("channels", "dense")  # what a client sends: channel_update or dense_update


@dataclass
class ChannelUpdate:
    examples: int
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (indices int32 [k], values float32 [k, ...])
    whole: dict[str, np.ndarray] = field(default_factory=dict)  # name -> the full float32 array

    def nbytes(self) -> int:
        """The payload on the wire: indices, rows and whole arrays."""
        sent = sum(i.nbytes + v.nbytes for i, v in self.rows.values())
        return int(sent + sum(w.nbytes for w in self.whole.values()))


# client side --------------------------------------------------------------------------------------
def channel_update(
    params: dict[str, np.ndarray], channel_params: dict[str, str], masks: dict[str, np.ndarray], whole: list[str], examples: int
) -> ChannelUpdate:
    """What a client sends: the selected rows of `channel_params` (parameter -> its layer, `masks[layer]` 0/1 per
    channel) and the `whole` parameters, copied as float32."""
    both = sorted(set(channel_params) & set(whole))
    if both:
        raise ValueError(f"sent both by rows and whole: {', '.join(both)}")
    rows = {}
    for name, layer in channel_params.items():
        indices = _selected(name, params[name], masks[layer])
        if indices.size:
            rows[name] = (indices, np.array(params[name][indices], dtype=F32))
    return ChannelUpdate(examples, rows, {name: np.array(params[name], dtype=F32) for name in whole})


def dense_update(params: dict[str, np.ndarray], names: list[str], examples: int) -> ChannelUpdate:
    """Every named parameter whole (FedAvg)."""
    return channel_update(params, {}, {}, names, examples)


def _selected(name: str, param: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if param.ndim == 0 or mask.shape != (param.shape[0],):
        raise ValueError(f"{name}: shape {param.shape} but its layer's mask has shape {mask.shape}")
    return np.flatnonzero(mask).astype(I32)


# server side --------------------------------------------------------------------------------------
def check_update(update: ChannelUpdate, reference: dict[str, np.ndarray]) -> str | None:
    """Why the server must reject `update` against its global parameters `reference`, or None."""
    if isinstance(update.examples, bool) or not isinstance(update.examples, int | np.integer) or update.examples <= 0:
        return f"examples must be a positive integer, got {update.examples!r}"
    both = sorted(set(update.rows) & set(update.whole))
    if both:
        return f"sent both by rows and whole: {', '.join(both)}"
    for name, entry in update.rows.items():
        reason = _check_rows(name, entry, reference)
        if reason:
            return reason
    for name, values in update.whole.items():
        reason = _check_whole(name, values, reference)
        if reason:
            return reason
    return None


def _check_rows(name: str, entry: object, reference: dict[str, np.ndarray]) -> str | None:
    if name not in reference:
        return f"unknown parameter {name!r}"
    if not isinstance(entry, tuple) or len(entry) != 2:
        return f"{name}: rows must be (indices, values)"
    indices, values = entry
    ref = reference[name]
    if ref.ndim == 0:
        return f"{name}: a scalar has no rows"
    if not isinstance(indices, np.ndarray) or indices.dtype != I32 or indices.ndim != 1:
        return f"{name}: indices must be a 1-D int32 array"
    if np.any(indices < 0) or np.any(indices >= ref.shape[0]):
        return f"{name}: an index out of range [0, {ref.shape[0]})"
    if np.unique(indices).size != indices.size:
        return f"{name}: a repeated index"
    return _check_array(name, values, (indices.size, *ref.shape[1:]))


def _check_whole(name: str, values: object, reference: dict[str, np.ndarray]) -> str | None:
    if name not in reference:
        return f"unknown parameter {name!r}"
    return _check_array(name, values, reference[name].shape)


def _check_array(name: str, values: object, shape: tuple[int, ...]) -> str | None:
    if not isinstance(values, np.ndarray) or values.dtype != F32:
        return f"{name}: values must be a float32 array"
    if values.shape != tuple(shape):
        return f"{name}: shape {values.shape}, expected {tuple(shape)}"
    if not np.all(np.isfinite(values)):
        return f"{name}: a value that is not finite (NaN or inf)"
    return None


def aggregate(global_params: dict[str, np.ndarray], updates: list[ChannelUpdate]) -> dict[str, np.ndarray]:
    """The new global parameters from checked updates: per row, the examples-weighted mean of the clients that
    sent it; rows nobody sent keep the global value. New float32 arrays; the inputs are not written."""
    sums = {name: np.zeros(p.shape, np.float64) for name, p in global_params.items()}
    weights = {name: np.zeros(p.shape[:1], np.float64) for name, p in global_params.items()}
    for update in updates:
        _unknown(update, global_params)
        n = float(update.examples)
        for name, (indices, values) in update.rows.items():
            sums[name][indices] += n * np.asarray(values, np.float64)
            weights[name][indices] += n
        for name, values in update.whole.items():
            sums[name] += n * np.asarray(values, np.float64)
            weights[name] += n
    return {name: _mean(p, sums[name], weights[name]) for name, p in global_params.items()}


def _unknown(update: ChannelUpdate, global_params: dict[str, np.ndarray]) -> None:
    unknown = sorted((set(update.rows) | set(update.whole)) - set(global_params))
    if unknown:
        raise ValueError(f"unknown parameters in an update (check_update first): {', '.join(unknown)}")


def _mean(param: np.ndarray, sums: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sums / weights where a row was sent; the global value (bit-identical) elsewhere."""
    w = weights.reshape(weights.shape + (1,) * (sums.ndim - weights.ndim))
    mean = (sums / np.where(w > 0, w, 1.0)).astype(F32)
    return np.where(w > 0, mean, np.asarray(param, F32))
