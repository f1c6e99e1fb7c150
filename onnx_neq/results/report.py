"""Results of many runs: the paper-shaped table (Markdown + CSV) and the plots (PNG).

Table: rows budget x method, columns data sets, cells mean +- std over seeds of the test top-1
at the best validation epoch (the paper's metric); the best method per budget in bold.
Plots: test top-1 per epoch per method; test top-1 against the mean training step (ms/step), one point
per method x budget x backend; per-layer fraction of neurons updated per epoch.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
import shutil
import tempfile
import uuid
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from onnx_neq.backends.base import SPECIALIZED
from onnx_neq.errors import NeqError
from onnx_neq.results.plan import method_label
from onnx_neq.selection.registry import FULL, RANDOM, SELECTORS, SU, VELOCITY
from onnx_neq.training import metrics
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.scotti_policy import HYPER_FILE, read_hyper


@dataclass
class RunSummary:
    path: Path
    data: str
    method: str
    budget_ratio: float
    budget_label: str
    seed: int
    best_epoch: int
    test_at_best_val: float
    final_test: float
    updated_ratio: float  # mean share of the budget's total (in its unit: --cost) that the selections spent
    epochs: int
    test_curve: list[float]
    scheme: str | None = None  # Sparse Update scheme, for su runs
    step_ms: float = float("nan")  # mean training step over the epochs after the first (metrics.csv step_ms)
    backend: str = ""
    cost: str = "params"  # the run's cost model (--cost): the unit of its budget


COST_MARKERS = {"params": "o", "compute": "s", "memory": "^"}  # accuracy-vs-step markers per --cost


def summarize(path: str | Path) -> RunSummary:
    run = RunDir(path)
    if not run.exists():
        raise NeqError(f"{path} is not a run directory (no settings.json)")
    settings = run.settings()
    rows = run.metrics()
    if not rows:
        raise NeqError(f"{path} has no finished epoch")
    config, budget = settings["config"], settings["budget"]
    state = run.load_state()
    test = [float(r[metrics.TEST_TOP1]) for r in rows]
    test_at = {int(r[metrics.EPOCH]): float(r[metrics.TEST_TOP1]) for r in rows}
    spent = metrics.SPENT[config.get("cost") or "params"]  # the selection's cost in the budget's own unit
    updated = np.mean([int(r[spent]) for r in rows[1:] or rows]) / budget["total"]
    data = config["data"] + (f"@{_classes(config['classes'])}" if config.get("classes") else "")
    method = method_label(config["selector"], config)
    budgeted = SELECTORS[config["selector"]].budgeted if config["selector"] in SELECTORS else True
    amount = budget.get("amount", budget.get("params"))  # "params" in runs from before the cost models
    ratio = min(1.0, amount / budget["total"]) if budgeted else 1.0  # a budget above the total trains all
    label = config.get("budget_label") or (f"{ratio:.1%}" if budgeted else "100%")
    return RunSummary(
        run.path,
        data,
        method,
        ratio,
        label,
        int(config["seed"]),
        state.best_epoch,
        test_at.get(state.best_epoch, float("nan")),
        test[-1],
        float(updated),
        len(rows),
        test,
        config.get("su_scheme") if config["selector"] == SU else None,
        _mean_step_ms(rows),
        config.get("backend") or "",
        config.get("cost") or "params",
    )


def _mean_step_ms(rows: list[dict]) -> float:
    """Epoch 0 is left out where there are later epochs: it pays for warm-up and the first graph build."""
    steps = [float(r[metrics.STEP_MS]) for r in (rows[1:] or rows) if r.get(metrics.STEP_MS) not in (None, "")]
    return float(np.mean(steps)) if steps else float("nan")


def _classes(classes: list[int]) -> str:
    return f"{classes[0]}-{classes[-1]}" if classes == list(range(classes[0], classes[-1] + 1)) else ",".join(map(str, classes))


def results_csv(runs: list[RunSummary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "data",
            "method",
            "budget",
            "budget_ratio",
            "seed",
            "best_epoch",
            "test_top1_at_best_val",
            "final_test_top1",
            "mean_updated_ratio",
            "epochs",
            "step_ms",
            "backend",
            "cost",
            "run",
        ]
    )
    for r in sorted(runs, key=lambda r: (r.data, r.budget_label, _method_key(r.method), r.seed)):
        writer.writerow(
            [
                r.data,
                r.method,
                r.budget_label,
                f"{r.budget_ratio:.4f}",
                r.seed,
                r.best_epoch,
                f"{r.test_at_best_val:.4f}",
                f"{r.final_test:.4f}",
                f"{r.updated_ratio:.4f}",
                r.epochs,
                f"{r.step_ms:.2f}",
                r.backend,
                r.cost,
                r.path,
            ]
        )
    return out.getvalue()


def _method_key(method: str) -> tuple[int, str]:
    """Registry order of the selector, then its variants by name."""
    order = list(SELECTORS)
    name = _selector_of(method)
    return (order.index(name) if name in order else len(order), method)


def _unbudgeted(method: str) -> bool:
    name = _selector_of(method)
    return name in SELECTORS and not SELECTORS[name].budgeted


def _selector_of(method: str) -> str:
    """'velocity[phi=flat]' -> 'velocity'."""
    return method.partition("[")[0]


def results_markdown(runs: list[RunSummary]) -> str:
    """Rows budget x method, columns data sets; mean and 95% confidence interval over seeds (in %), best
    per budget bold; then the paired comparisons."""
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    su_notes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in runs:
        cells[(r.budget_label, r.method, r.data)].append(100 * r.test_at_best_val)
        if r.method == SU:
            su_notes[(r.budget_label, r.data)].add(f"{r.data}: scheme {r.scheme or '?'}, {r.budget_ratio:.1%}")
    datas = sorted({r.data for r in runs})
    budgets = sorted({r.budget_label for r in runs if not _unbudgeted(r.method)}, key=_budget_key)
    lines = ["| budget | method | " + " | ".join(datas) + " |", "|---|---|" + "---|" * len(datas)]
    for budget in budgets + ["100%"]:
        methods = sorted({m for (b, m, _) in cells if b == budget}, key=_method_key)
        best = {d: max((np.mean(cells[(budget, m, d)]) for m in methods if cells.get((budget, m, d))), default=None) for d in datas}
        for m in methods:
            row = [_cell(cells.get((budget, m, d)), best[d]) for d in datas]
            lines.append(f"| {budget} | {m} | " + " | ".join(row) + " |")
    by_data = {d: ", ".join(map(str, sorted({r.seed for r in runs if r.data == d}))) for d in datas}
    seeds = next(iter(by_data.values())) if len(set(by_data.values())) == 1 else "; ".join(f"{d}: {s}" for d, s in by_data.items())
    lines.append("")
    lines.append(
        f"Test top-1 (%) at the best validation epoch, mean ± half-width of the 95% Student-t confidence interval over seeds {seeds} (± 0 with a single seed); best per budget in bold."
    )
    if su_notes:
        notes = "; ".join(
            f"{budget}: {', '.join(sorted(v))}" for (budget, _), v in sorted(su_notes.items(), key=lambda kv: _budget_key(kv[0][0]))
        )
        lines.append(
            f"su runs the built-in Sparse Update scheme nearest each budget, which trains its own share of the conv parameters ({notes})."
        )
    return "\n".join(lines + paired_markdown(runs))


def comparison_pairs(methods: set[str]) -> list[tuple[str, str]]:
    """velocity vs random, and every other budgeted method (new selectors, variants) vs velocity and vs random."""
    bases = (VELOCITY, RANDOM)
    pairs = [bases] if set(bases) <= methods else []
    for m in sorted(methods, key=_method_key):
        if m not in bases and not _unbudgeted(m):
            pairs += [(m, base) for base in bases if base in methods]
    return pairs


def paired_markdown(runs: list[RunSummary]) -> list[str]:
    """The paired comparisons: a pair = the same data set, budget and seed; pooled, then per data set."""
    from onnx_neq.results.statistics import format_paired_markdown, paired_table

    records = [{"method": r.method, "data": r.data, "budget": r.budget_label, "seed": r.seed, "top1": r.test_at_best_val} for r in runs]
    per_data = len({r.data for r in runs}) > 1
    results = paired_table(records, comparison_pairs({r.method for r in runs}), tie=PAIRED_TIE, per_data=per_data)
    if not results:
        return []
    return [
        "",
        "Paired comparisons (a pair: same data set, budget and seed"
        + ("; each comparison pooled over data sets, then per data set):" if per_data else "):"),
        "",
        format_paired_markdown(results),
        "",
        f"W/T/L: runs where A's test top-1 is above / within {100 * PAIRED_TIE:.2f} points of / below B's. p: two-sided Wilcoxon signed-rank and paired t-test.",
    ]


PAIRED_TIE = 0.0005  # a tie: within 0.05 points of top-1 (one image in 2000)


def _budget_key(label: str) -> float:
    return float(label.rstrip("%"))


def _cell(values: list[float] | None, best: float | None) -> str:
    from onnx_neq.results.statistics import mean_ci

    if not values:
        return "–"
    mean, half = mean_ci(values) if len(values) > 1 else (values[0], 0.0)
    text = f"{mean:.2f} ± {half:.2f}"
    return f"**{text}**" if best is not None and np.isclose(np.mean(values), best) else text


def plot_accuracy(runs: list[RunSummary], path: Path) -> Path:
    """Test top-1 per epoch: a row per data set, a column per budget, a line per method (mean over seeds)."""
    plt = _pyplot()
    datas = sorted({r.data for r in runs})
    budgets = sorted({r.budget_label for r in runs if not _unbudgeted(r.method)}, key=_budget_key) or ["100%"]
    fig, axes = plt.subplots(len(datas), len(budgets), figsize=(4.5 * len(budgets), 3.4 * len(datas)), squeeze=False)
    for row, data in enumerate(datas):
        for col, budget in enumerate(budgets):
            ax = axes[row][col]
            for method in sorted({r.method for r in runs}, key=_method_key):
                curves = [
                    r.test_curve
                    for r in runs
                    if r.data == data and r.method == method and (r.budget_label == budget or _unbudgeted(method))
                ]
                if curves:
                    n = min(len(c) for c in curves)
                    ax.plot(
                        range(n), 100 * np.mean([c[:n] for c in curves], axis=0), label=method, linestyle="--" if method == FULL else "-"
                    )
            ax.set(title=f"{data}, budget {budget}", xlabel="epoch", ylabel="test top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_step(runs: list[RunSummary], path: Path) -> Path:
    """Test top-1 at the best validation epoch against ms per training step: one point per method x budget
    x backend x cost model, means over seeds, labelled with its budget; a panel per data set. Colour:
    selector; marker: cost model; hollow: a masked backend (every gradient computed), filled: specialized."""
    plt = _pyplot()
    datas = sorted({r.data for r in runs})
    fig, axes = plt.subplots(1, len(datas), figsize=(8.5 * len(datas), 5.5), squeeze=False)
    for ax, data in zip(axes[0], datas):
        groups: dict[tuple, list[RunSummary]] = defaultdict(list)
        for r in runs:
            if r.data == data and np.isfinite(r.step_ms):
                groups[(r.method, r.budget_label, r.backend, r.cost)].append(r)
        for (method, label, backend, cost), members in sorted(
            groups.items(), key=lambda kv: (_method_key(kv[0][0]), _budget_key(kv[0][1]))
        ):
            x, y = np.mean([m.step_ms for m in members]), 100 * np.mean([m.test_at_best_val for m in members])
            colour = f"C{_method_key(method)[0]}"
            face = colour if backend == SPECIALIZED else "none"
            ax.scatter(x, y, edgecolors=colour, facecolors=face, marker=COST_MARKERS.get(cost, "o"), s=45, label=method)
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points", color="0.3")
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set(title=data, xlabel="ms per training step (mean)", ylabel="test top-1 at best val (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_heatmap(run: RunSummary, path: Path) -> Path:
    """Fraction of each layer's neurons updated, per epoch (layers on the y axis, in graph order)."""
    plt = _pyplot()
    rd = RunDir(run.path)
    epochs = sorted(int(p.stem.split("_")[1]) for p in rd.masks.glob("epoch_*.npz"))
    masks = [rd.load_masks(e) for e in epochs]
    names = list(masks[0])
    grid = np.array([[m[n].mean() for m in masks] for n in names])
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(epochs) + 3), max(4, 0.12 * len(names) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set(
        title=f"{run.method} on {run.data}, budget {run.budget_label}, seed {run.seed}", xlabel="epoch", ylabel="conv layer (graph order)"
    )
    xstep = max(1, len(epochs) // 15)
    ax.set_xticks(range(0, len(epochs), xstep), [str(e) for e in epochs[::xstep]])
    step = max(1, len(names) // 26)
    ax.set_yticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)], fontsize=6)
    fig.colorbar(image, ax=ax, label="fraction of neurons updated")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hyper(run: RunSummary, path: Path) -> Path:
    """A scotti run's hyper.csv: learning rate, momentum, threshold and frozen share per iteration."""
    plt = _pyplot()
    rows = read_hyper(RunDir(run.path))
    iterations = [int(r["iteration"]) for r in rows]
    panels = (("lr", "learning rate"), ("momentum", "momentum"), ("eps", "threshold eps"), ("frozen_share", "frozen share of neurons"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 7.5), sharex=True)
    for ax, (column, label) in zip(axes, panels):
        ax.plot(iterations, [float(r[column]) for r in rows], lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for epoch_start in sorted({int(r["epoch"]): int(r["iteration"]) for r in reversed(rows)}.values())[1:]:
        for ax in axes:
            ax.axvline(epoch_start, color="grey", lw=0.5, ls=":")
    axes[0].set_title(f"{run.method} on {run.data}, seed {run.seed} (dotted: epochs)")
    axes[-1].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NeqError("plots need matplotlib: pip install matplotlib (or onnx-neq[report])") from None
    return plt


def _label_backends(runs: list[RunSummary]) -> list[RunSummary]:
    """A method run on several backends (the same selector compared masked and specialised) is one
    method per backend: `full[backend=specialized]`, so the table and the pairs keep them apart."""
    backends: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        backends[r.method].add(r.backend)
    return [replace(r, method=_with_option(r.method, f"backend={r.backend}")) if len(backends[r.method]) > 1 else r for r in runs]


def _with_option(method: str, option: str) -> str:
    """velocity -> velocity[option]; velocity[phi=flat] -> velocity[phi=flat,option]."""
    return f"{method[:-1]},{option}]" if method.endswith("]") else f"{method}[{option}]"


def _distinct(runs: list[RunSummary]) -> list[RunSummary]:
    seen: dict[tuple, Path] = {}
    for r in runs:
        key = (r.data, r.method, r.budget_label, r.seed)
        if key in seen:
            raise NeqError(
                f"{seen[key]} and {r.path} are both {r.method} on {r.data} at {r.budget_label}, seed {r.seed}; report each run once"
            )
        seen[key] = r.path
    return runs


REPORT_INDEX = ".onnx-neq-report.json"  # the files a report wrote into its folder: all a later one may replace or remove
REPORT_FILES = (
    "results.csv", "results.md", "accuracy.png", "accuracy-vs-step.png", "heatmap-*.png", "hyper-*.png", "runs.json", REPORT_INDEX
)  # fmt: skip


def write_report(run_paths: list[str | Path], out: str | Path) -> dict[str, Path]:
    """results.csv, results.md, accuracy.png, accuracy-vs-step.png, a heatmap per velocity run group and the
    hyper-parameters of each scotti run (hyper-*.png, its first seed) into `out`.

    Drawn in a staging folder first, so a failure leaves the previous report whole and a reader never sees
    a half-written or mixed one. A folder holding nothing but report files is replaced whole (the staging
    folder, next to it, renamed into place); a folder holding other files keeps them: each report file is
    renamed into it, and the previous report's files (its REPORT_INDEX) that this one lacks are removed."""
    given, out = Path(out), Path(os.path.abspath(out))
    runs = _distinct(_label_backends([summarize(p) for p in run_paths]))
    if out.exists() and not out.is_dir():
        raise NeqError(f"{given} exists and is not a directory; choose another --out")
    whole = not out.exists() or (out != Path.cwd() and not out.is_symlink() and _only_report_files(out))
    (out.parent if whole else out).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent if whole else out))
    try:
        names = _draw(runs, staging)
        if whole:
            _replace_folder(staging, out)
        else:
            _replace_files(staging, out, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {key: given / name for key, name in names.items()}


def _draw(runs: list[RunSummary], folder: Path) -> dict[str, str]:
    """Every report file into `folder`; returns {key: file name} (runs.json and the index not among them)."""
    names = {"csv": "results.csv", "markdown": "results.md", "accuracy": "accuracy.png"}
    (folder / names["csv"]).write_text(results_csv(runs))
    (folder / names["markdown"]).write_text(results_markdown(runs) + "\n")
    plot_accuracy(runs, folder / names["accuracy"])
    if any(np.isfinite(r.step_ms) for r in runs):
        names["accuracy vs step"] = plot_accuracy_vs_step(runs, folder / "accuracy-vs-step.png").name
    for r in runs:
        if r.method == VELOCITY and r.seed == min(x.seed for x in runs):
            slug = _slug(f"{r.data}-{r.budget_label}")
            names[f"heatmap {slug}"] = plot_layer_heatmap(r, folder / f"heatmap-{slug}.png").name
    for r in runs:
        if (r.path / HYPER_FILE).exists() and r.seed == min(x.seed for x in runs):
            slug = _slug(f"{r.data}-{r.method}")
            names[f"hyper {slug}"] = plot_hyper(r, folder / f"hyper-{slug}.png").name
    (folder / "runs.json").write_text(json.dumps([str(r.path) for r in runs], indent=1))
    (folder / REPORT_INDEX).write_text(json.dumps(sorted([*names.values(), "runs.json", REPORT_INDEX])))
    return names


def _slug(text: str) -> str:
    """`text` as a file name part: fashion-mnist@5-9-8.8% -> fashion-mnist_5-9-8.8pct, scotti[eps=0.1] -> scotti_eps_0.1."""
    return text.translate(str.maketrans({":": "_", "/": "_", "@": "_", "[": "_", "=": "_", ",": "_", "]": None, "%": "pct"}))


def _only_report_files(folder: Path) -> bool:
    """True when every entry of `folder` is a file by a name a report writes: the folder is then ours to
    replace whole."""
    return all(p.is_file() and any(fnmatch.fnmatchcase(p.name, f) for f in REPORT_FILES) for p in folder.iterdir())


def _previous_report(folder: Path) -> set[str]:
    """The file names the index of the report in `folder` lists that a report writes (none without a readable index)."""
    try:
        listed = json.loads((folder / REPORT_INDEX).read_text()) if (folder / REPORT_INDEX).is_file() else []
    except (OSError, ValueError):
        return set()
    names = listed if isinstance(listed, list) else []
    return {n for n in names if isinstance(n, str) and any(fnmatch.fnmatchcase(n, f) for f in REPORT_FILES) and "/" not in n}


def _replace_folder(staging: Path, out: Path) -> None:
    """`staging` becomes `out`; the previous `out` (report files only) is moved aside, then removed."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _replace_files(staging: Path, out: Path, names: dict[str, str]) -> None:
    """Each new report file renamed into `out` (the index last), then the previous report's files this one
    lacks removed; no other file of `out` is touched."""
    previous = _previous_report(out)
    written = [*names.values(), "runs.json", REPORT_INDEX]
    blocked = [name for name in written if (out / name).exists() and not (out / name).is_file()]
    if blocked:
        raise NeqError(f"{out / blocked[0]} is in the way of the report and not a file; move it, or choose another --out")
    for name in written:
        os.replace(staging / name, out / name)
    for name in sorted(previous - set(written)):
        if (out / name).is_file():
            (out / name).unlink()
