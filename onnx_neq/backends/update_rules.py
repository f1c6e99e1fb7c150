"""Update rules: an update on the host that replaces a backend's optimizer (SCoTTi's momentum SGD with learned
hyper-parameters, selection/scotti.py; prune's SGD masked per weight, training/prune_policy.py).

    attach_rule(session, rule)      the session's updates from now on are the rule's (NeqError where it cannot be)

Per step, after the forward and backward pass, the backend calls `rule.prepare(grads)` (the rule learns from
the step's gradients and returns the channel masks of this update), recomputes the pass when those masks
train a channel whose gradient it did not compute, then `rule.step(params, grads)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from onnx_neq.backends.base import PORTABLE, SPECIALIZED
from onnx_neq.errors import NeqError

Grads = Mapping[str, tuple[np.ndarray, "np.ndarray | None"]]  # parameter -> (gradient of `rows`, rows; None: every row)


class UpdateRule(Protocol):
    """An update that replaces a host backend's optimizer (SCoTTi, selection/scotti.py): per step it learns
    from the gradients (`prepare`, which returns the channel masks of this update: per layer, bool), then
    changes the parameters in place (`step`), never writing a frozen row."""

    def bind(self, param_layers: dict[str, str], ste: set[str], layer_sizes: dict[str, int]) -> None: ...
    def prepare(self, grads: Grads) -> dict[str, np.ndarray]: ...
    def step(self, params: dict[str, np.ndarray], grads: Grads) -> None: ...


class HostGradients(Protocol):
    """What rule_step needs of a backend: its parameters and masks, the last step's gradients, a new pass."""

    params: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    recomputed: int

    def set_masks(self, masks: dict[str, np.ndarray]) -> None: ...
    def gradients(self) -> Grads: ...
    def forward_backward(self, images: np.ndarray, labels: np.ndarray) -> Any: ...


def rule_step(backend: HostGradients, rule: UpdateRule, images: np.ndarray, labels: np.ndarray, outputs: Any) -> Any:
    """One update by `rule` after the backend's forward and backward pass (`outputs`). When the rule's masks
    train a channel whose gradient the pass did not compute (the threshold fell), the pass runs again on the
    same batch and weights with those masks, so the update is exact; returns the outputs of the last pass."""
    masks = rule.prepare(backend.gradients())
    if any(np.any(mask & (backend.masks[name] == 0)) for name, mask in masks.items()):
        backend.set_masks(masks)
        outputs = backend.forward_backward(images, labels)
        backend.recomputed += 1
    rule.step(backend.params, backend.gradients())
    return outputs


class RuleHost:
    """What a host backend (it has `layers` and `rule`) adds to take update rules."""

    layers: dict
    rule: UpdateRule | None

    def set_update_rule(self, rule: UpdateRule) -> None:
        """Hand every update from now on to `rule`, bound to the channel parameters of each layer."""
        sizes = {layer.name: layer.out_channels for layer in self.layers.values()}
        rule.bind(self.channel_parameters(), self.freeze_scaled_parameters(), sizes)
        self.rule = rule

    def freeze_scaled_parameters(self) -> set[str]:
        """The parameters whose update a straight-through freeze scales (SCoTTi): the conv weights."""
        return {layer.weight for layer in self.layers.values()}

    def channel_parameters(self) -> dict[str, str]:
        """Each parameter whose rows freeze with a layer's channels -> the layer."""
        return {param: name for name, layer in self.layers.items() for param in filter(None, (layer.weight, layer.bias))}


def attach_rule(session: Any, rule: UpdateRule) -> None:
    """`session.set_update_rule(rule)`; NeqError for a backend whose updates never reach the host (ort-training)."""
    if not isinstance(session, RuleHost):
        raise NeqError(f"an update rule needs each step's gradients on the host; use --backend {SPECIALIZED} or {PORTABLE}")
    session.set_update_rule(rule)
