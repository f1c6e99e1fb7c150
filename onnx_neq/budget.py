"""The parameter budget of a run, resolved from --budget / --budget-ratio and the selector."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import NeqError

DEFAULT_RATIO = 0.308  # the paper's largest MobileNetV2 budget (Sparse Update scheme 5)


@dataclass
class Budget:
    params: int  # the bound on updated conv parameters per epoch
    total: int  # all selectable parameters
    source: str
    warnings: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.params / self.total


def resolve_budget(config, manifest, costs: np.ndarray, su_mask: np.ndarray | None) -> Budget:
    total = int(costs.sum())  # the selectable parameters (+ BatchNorm ones with --bn-update selected)
    if config.budget is not None and config.budget_ratio is not None:
        raise NeqError("give --budget or --budget-ratio, not both")
    if config.selector in ("full", "neq"):
        return Budget(total, total, f"none ({config.selector} has no budget)")
    params, source = _requested(config, total)
    su_params = int(costs[su_mask].sum()) if su_mask is not None else None
    if config.selector == "su" and source.startswith("default"):
        params, source = su_params, "the Sparse Update scheme"
    budget = Budget(params, total, source)
    cheapest = int(costs.min())
    if params < cheapest:
        raise NeqError(f"budget {params:,} is below the cheapest neuron ({cheapest:,} parameters); raise --budget to at least {cheapest:,}")
    if su_params is not None and su_params > params:
        raise NeqError(
            f"the Sparse Update scheme updates {su_params:,} parameters, more than the budget {params:,}; pick a smaller --su-scheme or raise the budget"
        )
    if params >= total:
        budget.warnings.append(
            f"budget {params:,} is at least the {total:,} selectable parameters: every neuron trains, as with --selector full"
        )
    if config.first_epoch_init == "full" and params < total:
        budget.warnings.append("--init full trains every neuron in the first epoch, above the budget")
    return budget


def _requested(config, total: int) -> tuple[int, str]:
    if config.budget is not None:
        return int(config.budget), "--budget"
    if config.budget_ratio is not None:
        if not 0 < config.budget_ratio:
            raise NeqError("--budget-ratio must be positive")
        return int(total * config.budget_ratio), f"--budget-ratio {config.budget_ratio}"
    return int(total * DEFAULT_RATIO), f"default {DEFAULT_RATIO:.1%} of the selectable parameters"
