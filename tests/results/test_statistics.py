"""Seed statistics for report: every expected value below is worked out by hand, not by the code under test."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("scipy")

from scipy import stats  # noqa: E402

from onnx_neq.results.statistics import Paired, format_paired_markdown, mean_ci, paired, paired_table  # noqa: E402

T_975_4 = 2.7764451051977987  # t_{0.975, 4}
T_95_4 = 2.131846786326649  # t_{0.95, 4}
T_975_3 = 3.182446305284263  # t_{0.975, 3}


def test_mean_ci_hand_values():
    mean, half = mean_ci([1, 2, 3, 4, 5])
    # s^2 = (4 + 1 + 0 + 1 + 4) / 4 = 2.5
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(T_975_4 * math.sqrt(2.5) / math.sqrt(5), rel=1e-12)
    _, half90 = mean_ci([1, 2, 3, 4, 5], confidence=0.90)
    assert half90 == pytest.approx(T_95_4 * math.sqrt(2.5) / math.sqrt(5), rel=1e-12)


def test_mean_ci_single_and_empty():
    mean, half = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], confidence=1.5)


def test_wilcoxon_exact_all_positive():
    # 5 distinct positive differences: only 1 of the 2^5 sign patterns is as extreme on each side -> 2/32
    r = paired([1, 2, 3, 4, 5], [0, 0, 0, 0, 0], "a", "b")
    assert r.p_wilcoxon == pytest.approx(2 / 32)
    assert (r.n, r.wins, r.ties, r.losses) == (5, 5, 0, 0)


def test_wilcoxon_exact_one_negative():
    # differences 1, 2, 3, -4, 5: W- = 4; subsets of {1..5} with rank sum <= 4: {}, 1, 2, 3, 4, 1+2, 1+3 -> 7
    r = paired([1, 2, 3, -4, 5], [0] * 5, "a", "b")
    assert r.p_wilcoxon == pytest.approx(2 * 7 / 32)


def test_paired_t_and_ci_by_hand():
    a = [0.72, 0.74, 0.69, 0.73]
    b = [0.70, 0.70, 0.70, 0.70]
    r = paired(a, b, "velocity", "random")
    # d = 0.02, 0.04, -0.01, 0.03; mean 0.02; squared deviations 0, 4e-4, 9e-4, 1e-4 -> SS = 1.4e-3, s^2 = 1.4e-3 / 3
    s = math.sqrt(1.4e-3 / 3)
    t_stat = 0.02 / (s / 2)
    assert r.mean_diff == pytest.approx(0.02)
    assert r.ci == pytest.approx(T_975_3 * s / 2, rel=1e-9)
    assert r.p_t == pytest.approx(2 * stats.t.sf(t_stat, 3), rel=1e-9)
    # |d| ranks 2, 4, 1, 3; W- = 1; subsets of {1..4} with sum <= 1: {}, {1} -> p = 2 * 2/16
    assert r.p_wilcoxon == pytest.approx(0.25)
    assert (r.wins, r.ties, r.losses) == (3, 0, 1)
    # swapping the sides flips the sign and the counts, not the p-values
    s_ = paired(b, a, "random", "velocity")
    assert s_.mean_diff == pytest.approx(-0.02) and (s_.wins, s_.ties, s_.losses) == (1, 0, 3)
    assert s_.p_t == pytest.approx(r.p_t) and s_.p_wilcoxon == pytest.approx(r.p_wilcoxon)


def test_wins_ties_losses_with_tie_margin():
    a = [0.80, 0.75, 0.70, 0.60, 0.81]
    b = [0.70, 0.745, 0.72, 0.60, 0.80]
    # d = +0.10, +0.005, -0.02, 0, +0.01 (exactly the margin: a tie)
    r = paired(a, b, "a", "b", tie=0.01)
    assert (r.wins, r.ties, r.losses) == (1, 3, 1)
    r0 = paired(a, b, "a", "b")
    assert (r0.wins, r0.ties, r0.losses) == (3, 1, 1)


def test_degenerate_cases():
    zero = paired([0.8, 0.7, 0.6], [0.8, 0.7, 0.6], "a", "b")
    assert (zero.wins, zero.ties, zero.losses) == (0, 3, 0)
    assert zero.mean_diff == 0 and math.isnan(zero.p_wilcoxon) and math.isnan(zero.p_t)
    # constant non-zero differences: no variance -> no t-test; all 3 signs positive -> Wilcoxon 2 * 1/8
    const = paired([0.8, 0.9, 0.75], [0.7, 0.8, 0.65], "a", "b")
    assert math.isnan(const.p_t) and const.ci == 0.0
    assert const.p_wilcoxon == pytest.approx(0.25)
    one = paired([0.8], [0.7], "a", "b")
    assert one.n == 1 and one.wins == 1 and math.isnan(one.ci) and math.isnan(one.p_wilcoxon) and math.isnan(one.p_t)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match=r"velocity has 3.*random has 2"):
        paired([0.1, 0.2, 0.3], [0.1, 0.2], "velocity", "random")


def _run(method, data, budget, seed, top1):
    return {"method": method, "data": data, "budget": budget, "seed": seed, "top1": top1}


def test_paired_table_pairs_by_data_budget_seed():
    rows = [
        _run("velocity", "cifar", 0.1, 0, 0.60),
        _run("random", "cifar", 0.1, 0, 0.55),
        _run("velocity", "cifar", 0.1, 1, 0.62),
        _run("random", "cifar", 0.1, 2, 0.10),  # seed 2 has no velocity partner, seed 1 no random one
        _run("velocity", "cifar", 0.3, 0, 0.70),
        _run("random", "cifar", 0.3, 0, 0.71),
        _run("velocity", "flowers", 0.1, 0, 0.40),
        _run("random", "flowers", 0.1, 0, 0.30),
        _run("random", "flowers", 0.3, 0, 0.99),  # no velocity run at this budget
    ]
    out = paired_table(rows, [("velocity", "random"), ("velocity", "neq")], per_data=True)
    # velocity vs neq has no matched run: skipped
    assert [(r.a, r.b, r.data) for r in out] == [
        ("velocity", "random", None),
        ("velocity", "random", "cifar"),
        ("velocity", "random", "flowers"),
    ]
    pooled, cifar, flowers = out
    # matched cells: cifar/0.1/0 (+0.05), cifar/0.3/0 (-0.01), flowers/0.1/0 (+0.10)
    assert pooled.n == 3 and (pooled.wins, pooled.ties, pooled.losses) == (2, 0, 1)
    assert pooled.mean_diff == pytest.approx(0.14 / 3)
    assert cifar.n == 2 and cifar.mean_diff == pytest.approx(0.02)
    assert flowers.n == 1 and flowers.mean_diff == pytest.approx(0.10)
    assert len(paired_table(rows, [("velocity", "random")])) == 1


def test_paired_table_rejects_duplicate_runs():
    rows = [_run("velocity", "cifar", 0.1, 0, 0.6), _run("velocity", "cifar", 0.1, 0, 0.7)]
    with pytest.raises(ValueError, match="two runs of velocity"):
        paired_table(rows, [("velocity", "random")])


def test_markdown_row():
    r = paired([0.72, 0.74, 0.69, 0.73], [0.70] * 4, "velocity", "random")
    # +2.00 pts; CI 100 * 3.1824 * 0.021602 / 2 = 3.44; t = 1.852 on 3 df -> p = 0.161
    text = format_paired_markdown([r, Paired("su", "neq", 1, -0.005, math.nan, 0, 0, 1, math.nan, math.nan, data="cifar")])
    lines = text.strip().splitlines()
    assert lines[0] == "| A vs B | n | mean diff (pts) ± 95% CI | W/T/L | Wilcoxon p | paired t p |"
    assert lines[2] == "| velocity vs random | 4 | +2.00 ± 3.44 | 3/0/1 | 0.250 | 0.161 |"
    assert lines[3] == "| su vs neq (cifar) | 1 | -0.50 ± n/a | 0/0/1 | n/a | n/a |"
    assert len(lines) == 4
