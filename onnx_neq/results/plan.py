"""The plan of `onnx-neq compare`: which runs (data x seeds x methods x budgets), where they land, and
with which settings. A method is a selector with variant settings, as compare takes it and the reports
label it: velocity[phi=flat,rank_cost=authors]; defaults and types come from the settings (training/config.py).
Light to import: the CLI reads the defaults here."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnx_neq.errors import NeqError
from onnx_neq.manifest import Manifest, read_manifest
from onnx_neq.selection.cost_model import cost_model
from onnx_neq.selection.registry import FULL, RANDOM, SELECTORS, SU, VELOCITY
from onnx_neq.selection.schemes import nearest_builtin_scheme
from onnx_neq.training.config import BY_NAME, TrainConfig
from onnx_neq.training.run_dir import RunDir

PAPER_RATIOS = (0.088, 0.212, 0.308)
DEFAULT_SEEDS = (0, 42, 100, 1, 2)
DEFAULT_METHODS = (VELOCITY, RANDOM, SU, FULL)


@dataclass
class CompareConfig:
    data: list[str]
    out: str
    artifacts: str | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    budget_ratios: list[float] = field(default_factory=lambda: list(PAPER_RATIOS))
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    train_options: dict = field(default_factory=dict)  # epochs, lr, batch_size, ... as for train


@dataclass
class PlannedRun:
    path: Path
    config: TrainConfig

    @property
    def done(self) -> bool:
        run = RunDir(self.path)
        return (self.path / "model.onnx").exists() and run.exists() and len(run.metrics()) == self.config.epochs


def plan(config: CompareConfig, artifacts_for: Callable[[str], str]) -> list[PlannedRun]:
    methods = [parse_method(m) for m in config.methods]
    runs = []
    for data in config.data:
        artifacts = artifacts_for(data)
        manifest = read_manifest(artifacts)
        for seed in config.seeds:
            for method, variant in methods:
                for ratio in config.budget_ratios if SELECTORS[method].budgeted else [None]:
                    runs.append(_planned(config, data, artifacts, manifest, method, variant, ratio, seed))
    return runs


def _planned(
    config: CompareConfig, data: str, artifacts: str, manifest: Manifest, method: str, variant: dict, ratio: float | None, seed: int
) -> PlannedRun:
    label = "100%" if ratio is None else f"{ratio:.1%}"
    options = {**config.train_options, **variant}
    options.update(artifacts=artifacts, data=data, selector=method, seed=seed, budget_label=label)
    slug = data.replace(":", "_").replace("/", "_").replace("@", "_")
    tag = method_label(method, options).replace("[", "-").replace("]", "").replace(",", "-").replace("=", "_")
    name = f"{tag}-seed{seed}" if ratio is None else f"{tag}-{label.replace('%', 'pct')}-seed{seed}"
    path = Path(config.out) / "runs" / slug / name
    run = TrainConfig(out=str(path), **options)
    scheme = su_scheme_near(run, manifest, ratio) if method == SU and options.get("cost") in (None, "params") else None
    if scheme is not None:
        run.su_scheme = str(scheme)
    elif ratio is not None:
        run.budget_ratio = ratio
    return PlannedRun(path, run)


def su_scheme_near(config: TrainConfig, manifest: Manifest, ratio: float) -> int | None:
    """The built-in Sparse Update scheme whose cost is nearest `ratio` of the total, in the unit of the cost
    model the run will use (its kind, --bn-update and batch size as train settles them); None where the
    settings do not validate (the run then fails with that error, reported with the others)."""
    settled = copy.deepcopy(config)
    try:
        settled.validate()
    except NeqError:
        return None
    model = cost_model(settled.cost_kind, manifest, settled.bn_update, settled.batch_size)
    return nearest_builtin_scheme(manifest, model, int(model.total * ratio))


# settings that make a variant of a selector, in label order: a selector's own options (its registry entry
# lists them), and run-wide ones that make a variant of every selector
VARIANTS = ("phi", "rank_cost", "cost", "gradnorm_pool", "eps", "hyper_lr", "eps_hyper_lr", "momentum", "weight_decay")
RUN_WIDE = {"cost": "params"}  # and the value that means the same as not giving it


def method_label(selector: str, config: dict) -> str:
    """`selector`, plus the variant settings of `config` that differ from their defaults: velocity[phi=flat]."""
    spec = SELECTORS.get(selector)
    changed = [
        f"{k}={config[k]}"
        for k in VARIANTS
        if config.get(k) not in (None, BY_NAME[k].default, RUN_WIDE.get(k), spec and spec.defaults.get(k))
        and (spec is None or k in spec.options or k in RUN_WIDE)
    ]
    return selector + (f"[{','.join(changed)}]" if changed else "")


def _value(key: str, value: str, text: str) -> int | float | str:
    kind = BY_NAME[key].kind
    try:
        return kind(value) if kind in (int, float) else value.strip()
    except ValueError:
        raise NeqError(f"{text!r}: {key} must be a number, not {value!r}") from None


def parse_method(text: str) -> tuple[str, dict]:
    """'velocity[phi=flat,rank_cost=authors]' -> ('velocity', {'phi': 'flat', 'rank_cost': 'authors'})."""
    name, _, rest = text.strip().partition("[")
    if name not in SELECTORS:
        raise NeqError(f"unknown method {name!r}; choose from {', '.join(SELECTORS)}")
    options = {}
    for item in filter(None, rest.rstrip("]").split(",")) if rest else []:
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in VARIANTS or not value:
            raise NeqError(f"{text!r}: variants are {', '.join(f'{k}=VALUE' for k in VARIANTS)}, e.g. velocity[phi=flat]")
        options[key] = _value(key, value, text)
    return name, options
