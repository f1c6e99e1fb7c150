"""The budget of a run, in the unit of its cost model (docs/ALGORITHM.md, "Budgets", "Cost models"):
parameters (--budget), backward MACs per image (--compute-budget) or bytes of training memory
(--memory-budget); --budget-ratio is a share of the total in that unit."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.selection.cost_model import CostModel, parse_amount
from onnx_neq.selection.registry import FULL, SELECTORS, SU

DEFAULT_RATIO = 0.308  # the paper's largest MobileNetV2 budget (Sparse Update scheme 5)


@dataclass(frozen=True)
class BudgetRequest:
    """What a run asks for: an amount in the unit of its cost model, or a share of the total, or neither
    (DEFAULT_RATIO). The flags name the two in messages and in Budget.source; training/config.py builds it
    from the settings (which also refuses more than one budget option)."""

    selector: str
    first_epoch: str  # the selection rule of epoch 0 (--init)
    amount: str | int | None = None  # e.g. 120000 parameters, "120M" MACs, "256KB"
    amount_flag: str = ""
    ratio: float | None = None
    ratio_flag: str = ""


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


def resolve_budget(request: BudgetRequest, model: CostModel, su_mask: np.ndarray | None) -> Budget:
    total, unit = model.total, model.unit
    if not SELECTORS[request.selector].budgeted:
        return Budget(total, total, f"none ({request.selector} has no budget)", unit)
    amount, source = _requested(request, model.kind, total)
    su_cost = model.cost(su_mask) if su_mask is not None else None
    if request.selector == SU and request.amount is None and request.ratio is None:
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
            f"budget {amount:,} is at least the {total:,} {unit} of training everything: every neuron trains, as with --selector {FULL}"
        )
    if request.first_epoch == FULL and amount < total:
        budget.warnings.append(f"--init {FULL} trains every neuron in the first epoch, above the budget")
    return budget


def requested_amount(request: BudgetRequest, model: CostModel) -> int:
    """The budget asked for, before any Sparse Update scheme replaces a default one."""
    return _requested(request, model.kind, model.total)[0]


def _requested(request: BudgetRequest, kind: str, total: int) -> tuple[int, str]:
    if request.amount is not None:
        return parse_amount(request.amount, kind), request.amount_flag
    if request.ratio is not None:
        if not 0 < request.ratio:
            raise NeqError(f"{request.ratio_flag} must be positive")
        return int(total * request.ratio), f"{request.ratio_flag} {request.ratio}"
    return int(total * DEFAULT_RATIO), f"default {DEFAULT_RATIO:.1%} of the total"
