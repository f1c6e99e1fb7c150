"""Seed statistics for `onnx-neq report`: is one selection method really better than another?

Confidence intervals of means over seeds, and paired comparisons of two methods over the same
(data set, budget, seed) cells: mean difference, win/tie/loss counts, Wilcoxon signed-rank and paired t p-values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

# Score differences are rounded to this many decimals before testing, so that differences that are equal
# on paper (0.80 - 0.79 and 0.71 - 0.70) are equal to the rank statistics, and a tie at exactly `tie` counts as one.
_DECIMALS = 12


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean of `values` and the half-width of its Student-t confidence interval.

    Half-width = t_{(1+confidence)/2, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1);
    nan for a single value. Raises ValueError for no values or a confidence outside (0, 1).
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan
    s = float(x.std(ddof=1))
    t = float(stats.t.ppf((1.0 + confidence) / 2.0, x.size - 1))
    return mean, t * s / math.sqrt(x.size)


@dataclass
class Paired:
    """Method `a` against method `b` over `n` paired scores (higher is better).

    mean_diff is mean(a - b) and ci the half-width of its 95% t interval; wins/ties/losses count the
    pairs where a is better / within `tie` / worse. p_wilcoxon and p_t are two-sided (nan where undefined).
    `data` is None for a comparison pooled over all data sets, else the one data set it covers.
    """

    a: str
    b: str
    n: int
    mean_diff: float
    ci: float
    wins: int
    ties: int
    losses: int
    p_wilcoxon: float
    p_t: float
    data: str | None = None


def mean_ci_text(values: Iterable[float], scale: float = 1.0, digits: int = 1) -> str:
    """ "mean ± half-width" of mean_ci, both times `scale`, with `digits` decimals (a single value: "± nan")."""
    mean, half = mean_ci(values)
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


def paired(
    a_scores: Sequence[float] | np.ndarray,
    b_scores: Sequence[float] | np.ndarray,
    a_name: str,
    b_name: str,
    tie: float = 0.0,
    data: str | None = None,
) -> Paired:
    """Compare two equal-length arrays of paired scores (element i of each from the same seed and data set).

    Differences with |a - b| <= tie count as ties (only in wins/ties/losses; the Wilcoxon and t tests use the differences themselves).
    Wilcoxon: scipy.stats.wilcoxon, zero_method="zsplit", exact for small n without ties or zeros;
    nan if n < 2 or every difference is zero. Paired t: nan if n < 2 or the differences do not vary.
    """
    a = np.asarray(a_scores, dtype=float).ravel()
    b = np.asarray(b_scores, dtype=float).ravel()
    if a.size != b.size:
        raise ValueError(f"paired scores differ in length: {a_name} has {a.size}, {b_name} has {b.size}")
    if a.size == 0:
        raise ValueError(f"no paired scores for {a_name} vs {b_name}")
    if tie < 0:
        raise ValueError(f"tie must be >= 0, got {tie}")
    d = np.round(a - b, _DECIMALS)
    n = int(d.size)
    mean, ci = mean_ci(d, 0.95)
    constant = bool(np.all(d == d[0]))  # exact after rounding; std() would leave float noise
    if n >= 2 and constant:
        ci = 0.0
    tie = round(tie, _DECIMALS)
    wins = int(np.sum(d > tie))
    losses = int(np.sum(d < -tie))

    p_w = math.nan
    p_t = math.nan
    if n >= 2:
        if np.any(d != 0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small-sample / ties notes from scipy
                p_w = float(stats.wilcoxon(d, zero_method="zsplit", alternative="two-sided").pvalue)
        if not constant:
            t_stat = mean / (float(d.std(ddof=1)) / math.sqrt(n))
            p_t = float(2.0 * stats.t.sf(abs(t_stat), n - 1))
    return Paired(
        a=a_name,
        b=b_name,
        n=n,
        mean_diff=mean,
        ci=ci,
        wins=wins,
        ties=n - wins - losses,
        losses=losses,
        p_wilcoxon=p_w,
        p_t=p_t,
        data=data,
    )


def paired_table(
    rows: Iterable[Mapping],
    pairs: Sequence[tuple[str, str]],
    tie: float = 0.0,
    per_data: bool = False,
    score: str = "top1",
) -> list[Paired]:
    """One Paired per (a, b) method pair, from run records {method, data, budget, seed, <score>}.

    Runs of a and b are paired when they share (data, budget, seed); runs without a partner are left out,
    and a pair with no matched cell gives no row. The pooled row counts every matched seed x data x budget
    cell as one pair; with per_data, it is followed by one row per data set (sorted by name).
    Raises ValueError if two records share (method, data, budget, seed).
    """
    by_method: dict[str, dict[tuple, float]] = {}
    for r in rows:
        key = (r["data"], r["budget"], r["seed"])
        cells = by_method.setdefault(r["method"], {})
        if key in cells:
            raise ValueError(f"two runs of {r['method']} for data={key[0]} budget={key[1]} seed={key[2]}")
        cells[key] = float(r[score])

    results: list[Paired] = []
    for a, b in pairs:
        a_cells, b_cells = by_method.get(a, {}), by_method.get(b, {})
        keys = sorted((k for k in a_cells if k in b_cells), key=repr)
        if not keys:
            continue
        results.append(paired([a_cells[k] for k in keys], [b_cells[k] for k in keys], a, b, tie=tie))
        if per_data:
            for data in sorted({k[0] for k in keys}, key=str):
                sub = [k for k in keys if k[0] == data]
                results.append(paired([a_cells[k] for k in sub], [b_cells[k] for k in sub], a, b, tie=tie, data=str(data)))
    return results


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.0005 else f"{p:.3f}"


def format_paired_markdown(results: Sequence[Paired]) -> str:
    """Markdown table of paired comparisons; scores are fractions, differences shown in percentage points."""
    lines = [
        "| A vs B | n | mean diff (pts) ± 95% CI | W/T/L | Wilcoxon p | paired t p |",
        "|---|---:|---:|:---:|---:|---:|",
    ]
    for r in results:
        name = f"{r.a} vs {r.b}" + (f" ({r.data})" if r.data is not None else "")
        ci = "n/a" if math.isnan(r.ci) else f"{100 * r.ci:.2f}"
        lines.append(
            f"| {name} | {r.n} | {100 * r.mean_diff:+.2f} ± {ci} | {r.wins}/{r.ties}/{r.losses} | {_p(r.p_wilcoxon)} | {_p(r.p_t)} |"
        )
    return "\n".join(lines) + "\n"
