"""`onnx-neq compare`: selectors x budgets x seeds x data sets from one command, then the report.

A method is a selector name, optionally with variant options: velocity[phi=flat,rank_cost=authors].
Runs land in OUT/runs/<data>/<method>-<budget>-seed<seed>/; a finished run is skipped and an
interrupted one resumed, so re-running the same command continues a long comparison. One compare
writes to an OUT at a time (OUT/.lock); OUT/report/ is drawn next to it and renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from onnx_neq.errors import NeqError, environment_error
from onnx_neq.results.plan import CompareConfig, plan
from onnx_neq.results.report import write_report
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.run_lock import RunLock
from onnx_neq.training.train import train

__all__ = ["CompareConfig", "compare", "plan"]


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
