"""`onnx-neq compare`: selectors x budgets x seeds x data sets from one command, then the report.

A method is a selector name, optionally with variant options: velocity[phi=flat,rank_cost=authors].
Runs land in OUT/runs/<data>/<method>-<budget>-seed<seed>/; a finished run is skipped and an
interrupted one resumed, so re-running the same command continues a long comparison. One compare
writes to an OUT at a time (OUT/.lock); OUT/report/ is drawn next to it and renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnx_neq.errors import NeqError, environment_error
from onnx_neq.manifest import read_manifest
from onnx_neq.results.report import write_report
from onnx_neq.selection.registry import SELECTORS, method_label, parse_method
from onnx_neq.selection.schemes import MOBILENET_V2_CONVS, scheme_params
from onnx_neq.selection.selectors import SU_SCHEMES
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.run_lock import RunLock
from onnx_neq.training.train import TrainConfig, train

PAPER_RATIOS = (0.088, 0.212, 0.308)
DEFAULT_SEEDS = (0, 42, 100, 1, 2)


@dataclass
class CompareConfig:
    data: list[str]
    out: str
    artifacts: str | None = None
    methods: list[str] = field(default_factory=lambda: ["velocity", "random", "su", "full"])
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
    config: CompareConfig, data: str, artifacts: str, manifest, method: str, variant: dict, ratio: float | None, seed: int
) -> PlannedRun:
    label = "100%" if ratio is None else f"{ratio:.1%}"
    options = {**config.train_options, **variant}
    options.update(artifacts=artifacts, data=data, selector=method, seed=seed, budget_label=label)
    if method == "su" and options.get("cost") in (None, "params"):
        options["su_scheme"] = str(nearest_su_scheme(manifest, int(manifest.selectable_params * ratio)))
    elif ratio is not None:
        options["budget_ratio"] = ratio
    slug = data.replace(":", "_").replace("/", "_").replace("@", "_")
    tag = method_label(method, options).replace("[", "-").replace("]", "").replace(",", "-").replace("=", "_")
    name = f"{tag}-seed{seed}" if ratio is None else f"{tag}-{label.replace('%', 'pct')}-seed{seed}"
    path = Path(config.out) / "runs" / slug / name
    return PlannedRun(path, TrainConfig(out=str(path), **options))


def nearest_su_scheme(manifest, budget: int) -> int:
    """The built-in MobileNetV2 scheme whose parameter count is nearest the budget."""
    if len(manifest.layers) != MOBILENET_V2_CONVS:
        raise NeqError(
            f"method su needs MobileNetV2 ({MOBILENET_V2_CONVS} convs) for its built-in schemes; this model has {len(manifest.layers)}"
        )
    return min(SU_SCHEMES, key=lambda k: abs(scheme_params(SU_SCHEMES[k], manifest) - budget))


def compare(
    config: CompareConfig, artifacts_for: Callable[[str], str], progress: Callable[[str, dict], None] | None = None
) -> dict[str, Path]:
    """Train every planned run not done yet, then write the report of those that finished. A run that
    stops with a NeqError (a setting that does not apply to it, e.g. no Sparse Update scheme fits a small
    compute budget) is reported by a "failed" event and left out; the others still run. One compare per
    OUT at a time (an OS lock on OUT/.lock); the report replaces OUT/report whole (report.write_report)."""
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise environment_error(exc, "create", "choose another --out") from None
    with RunLock(out):
        return _compare(config, artifacts_for, progress or (lambda event, info: None))


def _compare(config: CompareConfig, artifacts_for: Callable[[str], str], progress: Callable[[str, dict], None]) -> dict[str, Path]:
    runs = plan(config, artifacts_for)
    failed = set()
    for i, run in enumerate(runs):
        info = {"index": i + 1, "total": len(runs), "path": str(run.path)}
        if run.done:
            progress("skip", info)
            continue
        progress("run", info)  # not "start": train's own events pass through below, "start" among them
        try:
            train(run.config, resume=RunDir(run.path).exists(), progress=lambda e, d: progress(e, d))
        except NeqError as error:
            failed.add(run.path)
            progress("failed", {**info, "error": str(error)})
    finished = [r.path for r in runs if r.path not in failed]
    if not finished:
        raise NeqError(f"none of the {len(runs)} runs finished (each failure is printed above)")
    return write_report(finished, Path(config.out) / "report")
