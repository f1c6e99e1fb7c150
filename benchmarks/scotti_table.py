"""The SCoTTi table of BENCHMARKS.md from the runs of an `onnx-neq compare` (docs/benchmarks/scotti.md).

    python benchmarks/scotti_table.py RUNS_DIR [RUNS_DIR ...]

Per data set and method: backward FLOPs saved (metrics.csv flops_saved, mean over the epochs after the
warm-up), the measured step on the specialised backend (step_ms, same epochs) as a ratio to full fine-tuning
of the same seed (the runs of one seed ran one after the other, so the ratio is measured in one stretch),
and test top-1 at the best validation epoch; each a mean with the half-width of its 95% Student-t interval
over seeds. A run that diverged stops early (`diverged`); its figures are those of the epochs before, and its
test top-1 that of the model it kept (its best validation epoch before the divergence).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from onnx_neq.results.report import summarize
from onnx_neq.results.statistics import mean_ci_text as _cell
from onnx_neq.training import metrics
from onnx_neq.training.run_dir import RunDir

ROWS = {  # compare's method label -> the talk's row (eps 0.05, hyper_lr 1e-4, eps_hyper_lr 1e-4 are scotti's defaults)
    "scotti[hyper_lr=0.0,eps_hyper_lr=0.0]": "NEq (fixed eps 0.05, momentum SGD)",
    "scotti[eps=-1.0,eps_hyper_lr=0.0]": "hyper-gradient learning rate only",
    "scotti[eps_hyper_lr=0.0]": "NEq + hyper-gradient learning rate",
    "scotti": "SCoTTi (eps, lr and momentum learned)",
    "scotti[eps=0.1]": "SCoTTi, eps0 0.1",
    "scotti[hyper_lr=1e-05]": "SCoTTi, hyper lr 1e-5",
    "scotti[eps=0.1,hyper_lr=1e-05]": "SCoTTi, eps0 0.1, hyper lr 1e-5",
    "scotti[eps=-1.0,hyper_lr=0.0,eps_hyper_lr=0.0]": "full fine-tuning (momentum SGD)",
}
FULL = "scotti[eps=-1.0,hyper_lr=0.0,eps_hyper_lr=0.0]"


def _after_warmup(path: Path, column: str) -> float:
    rows = RunDir(path).metrics()
    values = [float(r[column]) for r in rows[1:] or rows if r.get(column) not in (None, "")]
    return float(np.mean(values)) if values else float("nan")


def table(run_dirs: list[Path]) -> str:
    cells: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for path in run_dirs:
        s = summarize(path)
        cells[(s.data, s.method)][s.seed] = {
            "saved": _after_warmup(path, metrics.FLOPS_SAVED),
            "step": _after_warmup(path, metrics.STEP_MS),
            "top1": s.test_at_best_val,
            "stopped": len(RunDir(path).metrics()) < int(RunDir(path).settings()["config"]["epochs"]),
        }
    lines = [
        "| data | method | backward FLOPs saved (%) | step ms | step / full (same seed) | test top-1 (%) | seeds | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for data in sorted({d for d, _ in cells}):
        full = cells.get((data, FULL), {})
        methods = [m for m in ROWS if (data, m) in cells] + sorted(m for d, m in cells if d == data and m not in ROWS)
        for method in methods:
            label = ROWS.get(method, method)
            runs = cells.get((data, method))
            if not runs:
                continue
            seeds = sorted(runs)
            ratios = [runs[k]["step"] / full[k]["step"] for k in seeds if k in full]
            lines.append(
                f"| {data} | {label} | {_cell([runs[k]['saved'] for k in seeds], 100)} | {_cell([runs[k]['step'] for k in seeds])}"
                f" | {_cell(ratios, 1, 2) if ratios else ''} | {_cell([runs[k]['top1'] for k in seeds], 100, 2)} | {len(seeds)}"
                f" | {sum(runs[k]['stopped'] for k in seeds)} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    paths = [p for root in argv for p in sorted(Path(root).glob("**/settings.json"))]
    print(table([p.parent for p in paths]))


if __name__ == "__main__":
    main(sys.argv[1:])
