"""The budget of a run, in the unit of its cost model (docs/ALGORITHM.md, "Budgets", "Cost models"):
parameters (--budget), backward MACs per image (--compute-budget) or bytes of training memory
(--memory-budget); --budget-ratio is a share of the total in that unit."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.selection.cost_model import CostModel, parse_amount
from onnx_neq.selection.registry import SELECTORS

DEFAULT_RATIO = 0.308  # the paper's largest MobileNetV2 budget (Sparse Update scheme 5)
AMOUNT_OPTIONS = {"params": "budget", "compute": "compute_budget", "memory": "memory_budget"}


@dataclass
class Budget:
    amount: int  # the bound on each epoch's selection, in `unit`
    total: int  # everything selected, in `unit`
    source: str
    unit: str = "selectable parameters"
    warnings: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.amount / self.total

    def describe(self) -> str:
        return f"{self.amount:,} of {self.total:,} {self.unit} ({min(self.ratio, 1):.1%}; {self.source})"


def resolve_budget(config, model: CostModel, su_mask: np.ndarray | None) -> Budget:
    total, unit = model.total, model.unit
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("budget", "compute_budget", "memory_budget", "budget_ratio")
        if getattr(config, name) is not None
    ]
    if len(given) > 1:
        raise NeqError(f"give one of {', '.join(given)}, not several")
    if not SELECTORS[config.selector].budgeted:
        return Budget(total, total, f"none ({config.selector} has no budget)", unit)
    amount, source = _requested(config, model.kind, total)
    su_cost = model.cost(su_mask) if su_mask is not None else None
    if config.selector == "su" and source.startswith("default"):
        amount, source = su_cost, "the Sparse Update scheme"
    budget = Budget(amount, total, source, unit)
    cheapest = int((model.per_neuron + model.reach[model.layer_of]).min())
    if amount < cheapest:
        raise NeqError(f"budget {amount:,} {unit} is below the cheapest neuron ({cheapest:,}); raise it to at least {cheapest:,}")
    if su_cost is not None and su_cost > amount:
        raise NeqError(
            f"the Sparse Update scheme costs {su_cost:,} {unit}, more than the budget {amount:,}; pick a smaller --su-scheme or raise the budget"
        )
    if amount >= total:
        budget.warnings.append(
            f"budget {amount:,} is at least the {total:,} {unit} of training everything: every neuron trains, as with --selector full"
        )
    if config.first_epoch_init == "full" and amount < total:
        budget.warnings.append("--init full trains every neuron in the first epoch, above the budget")
    return budget


def requested_amount(config, model: CostModel) -> int:
    """The budget asked for, before any Sparse Update scheme replaces a default one."""
    return _requested(config, model.kind, model.total)[0]


def _requested(config, kind: str, total: int) -> tuple[int, str]:
    option = AMOUNT_OPTIONS[kind]
    if getattr(config, option) is not None:
        return parse_amount(getattr(config, option), kind), f"--{option.replace('_', '-')}"
    if config.budget_ratio is not None:
        if not 0 < config.budget_ratio:
            raise NeqError("--budget-ratio must be positive")
        return int(total * config.budget_ratio), f"--budget-ratio {config.budget_ratio}"
    return int(total * DEFAULT_RATIO), f"default {DEFAULT_RATIO:.1%} of the total"
