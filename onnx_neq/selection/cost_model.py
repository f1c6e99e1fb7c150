"""What a selection costs: parameters, backward MACs per image, or bytes of training memory
(docs/ALGORITHM.md, "Cost models").

A cost model charges every neuron its own cost and, once per selection, the "reach" of its shallowest
selected layer: what the backward pass must compute or keep to get down to that layer.

    params   per neuron: its conv parameters (+2 BatchNorm parameters with --bn-update selected); reach 0
    compute  per neuron: its weight-gradient MACs, (C_in/groups)*kh*kw*H_out*W_out;
             reach(L): the input-gradient MACs of every conv after L (each = its forward MACs)
    memory   per neuron: 4 bytes * its parameters * (1 gradient + optimizer state: SGD 0, AdamW 2);
             reach(L): the float32 inputs of every conv from L on, for a batch, kept for the backward pass

Elementwise ops, the BatchNorm backward and the classifier are not counted: these are models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.manifest import Layer, Manifest

KINDS = ("params", "compute", "memory")
UNITS = {"params": "selectable parameters", "compute": "backward MACs per image", "memory": "bytes"}
FLOAT_BYTES = 4
OPTIMIZER_STATES = {"sgd": 0, "adamw": 2}


@dataclass(frozen=True)
class CostModel:
    kind: str
    per_neuron: np.ndarray  # int64, one entry per neuron in manifest layer order
    layer_of: np.ndarray  # the layer index of each neuron
    reach: np.ndarray  # int64 per layer, + a trailing 0: the cost of reaching layer L (non-increasing)

    @property
    def unit(self) -> str:
        return UNITS[self.kind]

    @property
    def total(self) -> int:
        """Everything selected: every neuron and the reach down to the first layer."""
        return int(self.per_neuron.sum() + self.reach[0])

    def cost(self, selected: np.ndarray) -> int:
        """The cost of a boolean selection over all neurons."""
        if not selected.any():
            return 0
        shallowest = int(self.layer_of[selected].min())
        return int(self.per_neuron[selected].sum() + self.reach[shallowest])


def cost_model(kind: str, manifest: Manifest, bn_update: str = "always", batch_size: int = 1) -> CostModel:
    if kind not in KINDS:
        raise NeqError(f"--cost must be one of {', '.join(KINDS)}, not {kind!r}")
    layers = manifest.layers
    if kind != "params":
        _need_shapes(layers, kind)
    params = np.array([layer.neuron_cost + (2 if bn_update == "selected" and layer.bn else 0) for layer in layers], np.int64)
    if kind == "params":
        per_layer, reach = params, np.zeros(len(layers) + 1, np.int64)
    elif kind == "compute":
        per_layer = np.array([_weight_grad_macs(layer) for layer in layers], np.int64)
        after = np.array([_forward_macs(layer) for layer in layers], np.int64)
        reach = np.append(np.cumsum(after[::-1])[::-1][1:], [0, 0]).astype(np.int64)  # convs strictly after L
    else:
        states = OPTIMIZER_STATES.get(manifest.optimizer, 0)
        per_layer = params * FLOAT_BYTES * (1 + states)
        inputs = np.array([FLOAT_BYTES * batch_size * int(np.prod(layer.input_shape)) for layer in layers], np.int64)
        reach = np.append(np.cumsum(inputs[::-1])[::-1], 0).astype(np.int64)  # convs from L on
    sizes = [layer.out_channels for layer in layers]
    return CostModel(kind, np.repeat(per_layer, sizes), np.repeat(np.arange(len(layers)), sizes), reach)


def greedy_fill(order: np.ndarray, model: CostModel, budget: int, backfill: bool = False) -> np.ndarray:
    """The one fill under a budget (docs/ALGORITHM.md, "Budgets"): walk neurons in `order`; each costs its
    own cost plus, when its layer is shallower than every selected one so far, the extra reach down to it.
    Take it while the total stays <= budget. Without backfill stop at the first neuron that does not fit
    (the authors' code); with it, skip and go on. A model with reach always skips: a shallow neuron early
    in the order would otherwise end the walk."""
    order = np.asarray(order)
    if not model.reach.any():
        return _fill_without_reach(order, model.per_neuron, budget, backfill)
    selected = np.zeros(len(model.per_neuron), bool)
    total, shallowest = 0, len(model.reach) - 1
    per_neuron, layer_of, reach = model.per_neuron.tolist(), model.layer_of.tolist(), model.reach.tolist()
    for i in order.tolist():
        layer = layer_of[i]
        extra = reach[layer] - reach[shallowest] if layer < shallowest else 0
        if total + per_neuron[i] + extra <= budget:
            selected[i] = True
            total += per_neuron[i] + extra
            shallowest = min(shallowest, layer)
    return selected


def _fill_without_reach(order: np.ndarray, costs: np.ndarray, budget: int, backfill: bool) -> np.ndarray:
    """greedy_fill when only the neurons' own costs count (params): a cumulative sum does it at once."""
    selected = np.zeros(len(costs), bool)
    if not backfill:
        fits = np.cumsum(costs[order]) <= budget
        stop = len(order) if fits.all() else int(np.argmin(fits))
        selected[order[:stop]] = True
        return selected
    total = 0
    for i in order:
        if total + costs[i] <= budget:
            selected[i] = True
            total += int(costs[i])
    return selected


def params_model(costs: np.ndarray) -> CostModel:
    """A params cost model over bare per-neuron costs (one layer, no reach): for selections outside a manifest."""
    costs = np.asarray(costs, np.int64)
    return CostModel("params", costs, np.zeros(len(costs), np.int64), np.zeros(2, np.int64))


def parse_amount(text: str | int, kind: str) -> int:
    """'256KB' -> 262144 (bytes; K/M/G = 1024 powers), '12M' -> 12_000_000 (MACs; K/M/G = 1000 powers)."""
    if isinstance(text, int):
        return text
    raw = str(text).strip().upper().replace("_", "").replace(",", "")
    base = 1024 if kind == "memory" else 1000
    suffixes = {"K": base, "M": base**2, "G": base**3}
    number = raw[:-1] if kind == "memory" and raw.endswith("B") else raw
    scale = suffixes.get(number[-1:], 1)
    number = number[:-1] if number[-1:] in suffixes else number
    try:
        value = float(number) * scale
    except ValueError:
        example = "256KB, 1.5MB" if kind == "memory" else "120M, 2.5G"
        raise NeqError(f"cannot read {text!r} as an amount of {UNITS[kind]}; write a number with an optional suffix ({example})") from None
    if not value > 0:
        raise NeqError(f"the {kind} budget must be above 0, not {text!r}")
    return int(value)


def _weight_grad_macs(layer: Layer) -> int:
    """Per output channel: (C_in/groups) * kh * kw MACs at each output position."""
    return (layer.in_channels // layer.groups) * int(np.prod(layer.kernel)) * _positions(layer)


def _forward_macs(layer: Layer) -> int:
    return layer.out_channels * _weight_grad_macs(layer)


def _positions(layer: Layer) -> int:
    return int(np.prod(layer.output_shape[1:]))


def _need_shapes(layers: list[Layer], kind: str) -> None:
    unknown = [layer.name for layer in layers if not layer.output_shape or not layer.input_shape]
    if unknown:
        raise NeqError(
            f"--cost {kind} needs every conv's static shape, unknown for {unknown[0]} (+{len(unknown) - 1} more); "
            "prepare again with --input-shape N,C,H,W"
        )
