"""Every selector, once: its name, whether a budget binds it, what statistics it needs, its first-epoch
rule, its options and its function (docs/ALGORITHM.md, "Selection"). The CLI, train, compare, report
and the Sparse Update code read this table; adding a selector is one entry and one function.

A selector function takes a SelectionInputs and returns a boolean mask over every neuron (manifest
layer order). Budgeted selectors produce an order and let `inputs.fill` take it within the budget
(in the unit of the run's cost model, reach included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from onnx_neq.selection.cost_model import CostModel, greedy_fill
from onnx_neq.selection.gradient import fisher_order, gradnorm_order
from onnx_neq.selection.selectors import select_full, select_neq, select_scotti, velocity_ranking

# the selectors' names: spelled here only (--selector, settings.json, compare's methods and the reports use them)
VELOCITY, RANDOM, SU, FULL, NEQ, GRADNORM, FISHER = "velocity", "random", "su", "full", "neq", "gradnorm", "fisher"
SCOTTI = "scotti"


class Needs:
    """Statistics a selector may need; train collects only what the chosen selector asks for."""

    VELOCITY = "velocity"
    WEIGHT_NORMS = "weight norms"
    GRADIENT_NORMS = "gradient norms"
    FISHER = "fisher"


PROBED = {Needs.GRADIENT_NORMS, Needs.FISHER}  # statistics measured by the gradient probe, on probe batches


@dataclass
class SelectionInputs:
    epoch: int
    model: CostModel  # the budget's unit
    budget: int
    rank_costs: np.ndarray  # what ranking divides by (--rank-cost)
    rng: np.random.Generator
    backfill: bool = False
    layer_sizes: list[int] = field(default_factory=list)
    velocity: np.ndarray | None = None
    su_mask: np.ndarray | None = None
    gradient_norms: np.ndarray | None = None  # running per-channel weight-gradient norms
    trained_ever: np.ndarray | None = None  # channels selected in an earlier epoch
    fisher: np.ndarray | None = None
    options: dict = field(default_factory=dict)  # the selector's own options, by config field name

    def fill(self, order: np.ndarray) -> np.ndarray:
        return greedy_fill(order, self.model, self.budget, self.backfill)


@dataclass(frozen=True)
class SelectorSpec:
    name: str
    select: Callable[[SelectionInputs], np.ndarray]
    budgeted: bool
    needs: tuple[str, ...]
    first_epoch: str | None  # None: the selector runs at epoch 0 too; else the default --init for epoch 0
    options: tuple[str, ...]  # the settings it reads, by name (training/config.py; tests check each is one)
    summary: str
    defaults: dict = field(default_factory=dict)  # its own defaults of options whose setting defaults to None
    policy: str | None = None  # "module:Class" of its loop Policy when it acts inside an epoch (None: SelectorPolicy)


def _velocity(s: SelectionInputs) -> np.ndarray:
    return s.fill(velocity_ranking(s.velocity, s.rank_costs))


def _random(s: SelectionInputs) -> np.ndarray:
    return s.fill(s.rng.permutation(len(s.rank_costs)))


def _su(s: SelectionInputs) -> np.ndarray:
    return s.su_mask.copy()


def _full(s: SelectionInputs) -> np.ndarray:
    return select_full(s.rank_costs)


def _neq(s: SelectionInputs) -> np.ndarray:
    return select_neq(s.velocity, s.options["eps"])


def _scotti(s: SelectionInputs) -> np.ndarray:
    return select_scotti(s.velocity, s.options["eps"])


def _gradnorm(s: SelectionInputs) -> np.ndarray:
    pool = s.options.get("gradnorm_pool") or None
    order = gradnorm_order(s.gradient_norms, s.trained_ever, s.rank_costs, s.rng, s.epoch == 0, s.layer_sizes, pool)
    return greedy_fill(order, s.model, s.budget, backfill=True)


def _fisher(s: SelectionInputs) -> np.ndarray:
    return greedy_fill(fisher_order(s.fisher, s.rank_costs, s.rng), s.model, s.budget, backfill=True)


SELECTORS: dict[str, SelectorSpec] = {
    spec.name: spec
    for spec in (
        SelectorSpec(
            VELOCITY,
            _velocity,
            True,
            (Needs.VELOCITY,),
            RANDOM,
            ("mu", "recurrence", "phi", "rank_cost", "velocity_images", "backfill"),
            "largest |velocity| per cost first",
        ),
        SelectorSpec(RANDOM, _random, True, (), None, ("backfill",), "a fresh random order every epoch"),
        SelectorSpec(SU, _su, True, (Needs.WEIGHT_NORMS,), None, ("su_scheme",), "static Sparse Update scheme (largest weight norms)"),
        SelectorSpec(FULL, _full, False, (), None, (), "every neuron, no budget"),
        SelectorSpec(
            NEQ,
            _neq,
            False,
            (Needs.VELOCITY,),
            FULL,
            ("eps", "mu", "recurrence", "phi", "velocity_images"),
            "|velocity| > eps, no budget",
            {"eps": 1e-3},
        ),
        SelectorSpec(
            SCOTTI,
            _scotti,
            False,
            (Needs.VELOCITY,),
            FULL,
            ("eps", "momentum", "hyper_lr", "eps_hyper_lr", "weight_decay", "mu", "recurrence", "phi", "velocity_images"),
            "NEq with a threshold, learning rate and momentum learned every step (SCoTTi), no budget",
            {"eps": 0.05},
            "onnx_neq.training.scotti_policy:ScottiPolicy",
        ),
        SelectorSpec(
            GRADNORM,
            _gradnorm,
            True,
            (Needs.GRADIENT_NORMS,),
            None,
            ("probe_batches", "gradnorm_pool", "rank_cost"),
            "channels drawn in proportion to their running weight-gradient norm (MeDyate)",
        ),
        SelectorSpec(
            FISHER,
            _fisher,
            True,
            (Needs.FISHER,),
            None,
            ("probe_batches", "rank_cost"),
            "channels drawn in proportion to Fisher potential per cost (TinyTrain)",
        ),
    )
}

RANK_COSTS = ("exact", "authors")  # --rank-cost: what rankings divide by (docs/ALGORITHM.md, "Neurons and costs")
FIRST_EPOCH_RULES = (RANDOM, SU, FULL)  # --init: what a selector with a first-epoch rule does at epoch 0
