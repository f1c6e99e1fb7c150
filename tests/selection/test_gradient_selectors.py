"""Gradient selectors: the budget, the sampling law against hand-computed probabilities, the layer pool,
determinism, and the running norm's arithmetic and checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest

from onnx_neq.errors import NeqError
from onnx_neq.selection.cost_model import greedy_fill, params_model
from onnx_neq.selection.gradient import RunningNorm, fisher_order, gradnorm_order

DRAWS = 4000


def select_gradnorm(norms, trained, costs, budget, rng, first_epoch=False, layer_sizes=None, pool_layers=None):
    """The registry's gradnorm selector: its draw order filled to a parameter budget, skipping misfits."""
    order = gradnorm_order(norms, trained, costs, rng, first_epoch, layer_sizes, pool_layers)
    return greedy_fill(order, params_model(costs), budget, backfill=True)


def select_fisher(fisher, costs, budget, rng):
    """The registry's fisher selector: its draw order filled to a parameter budget, skipping misfits."""
    return greedy_fill(fisher_order(fisher, costs, rng), params_model(costs), budget, backfill=True)


def _frequencies(select, n: int, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros(n)
    for _ in range(draws):
        counts += select(rng)
    return counts / draws


def _assert_close_to(freq: np.ndarray, p: np.ndarray, draws: int = DRAWS) -> None:
    """Within 4.5 binomial standard deviations (plus a floor for p = 0 or 1)."""
    sd = np.sqrt(np.asarray(p) * (1 - np.asarray(p)) / draws)
    assert np.all(np.abs(freq - p) <= 4.5 * sd + 1e-9), (freq, p)


def test_budget_never_exceeded_and_filled():
    for seed in range(300):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 40))
        costs = rng.integers(1, 60, n)
        budget = int(rng.integers(0, costs.sum() + 10))
        norms = rng.random(n) * (rng.random(n) < 0.7)
        trained = rng.random(n) < 0.5
        fisher = rng.random(n) ** 3 * (rng.random(n) < 0.6)
        chosen = [
            select_gradnorm(norms, trained, costs, budget, rng, first_epoch=bool(seed % 3 == 0)),
            select_fisher(fisher, costs, budget, rng),
        ]
        sizes = np.diff(np.sort(np.concatenate([[0, n], rng.choice(np.arange(1, n), size=min(n - 1, 3), replace=False)])))
        sizes = sizes[sizes > 0]
        pooled = select_gradnorm(norms, trained, costs, budget, rng, layer_sizes=sizes, pool_layers=2)
        assert costs[pooled].sum() <= budget
        for selected in chosen:
            assert selected.dtype == bool and selected.shape == (n,)
            used = int(costs[selected].sum())
            assert used <= budget, seed
            # backfill: nothing left out would still fit
            assert (~selected).sum() == 0 or costs[~selected].min() > budget - used, seed


def _one_of(norms, trained=None, first_epoch=False, **kw):
    """A selector over equal-cost channels with a budget for exactly one of them."""
    n = len(norms)
    trained = np.ones(n, bool) if trained is None else np.asarray(trained)
    return lambda rng: select_gradnorm(np.asarray(norms, float), trained, np.full(n, 7), 7, rng, first_epoch=first_epoch, **kw)


def test_gradnorm_samples_in_proportion_to_the_norm():
    freq = _frequencies(_one_of([1.0, 2.0, 3.0, 4.0]), 4)
    assert np.all(freq.sum() == 1.0)
    _assert_close_to(freq, np.array([1, 2, 3, 4]) / 10)


def test_gradnorm_without_replacement_two_of_four():
    """Budget for two: P(i in the pair) = p_i + sum_{j != i} p_j p_i / (1 - p_j) (successive sampling)."""
    w = np.array([1.0, 2.0, 3.0, 4.0])
    p = w / w.sum()
    expected = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)])
    freq = _frequencies(lambda rng: select_gradnorm(w, np.ones(4, bool), np.full(4, 3), 6, rng), 4)
    _assert_close_to(freq, expected)
    assert freq.sum() == pytest.approx(2.0)


def test_first_epoch_is_uniform():
    freq = _frequencies(_one_of([1.0, 0.0, 30.0, 4.0], first_epoch=True), 4)
    _assert_close_to(freq, np.full(4, 0.25))


def test_nothing_trained_yet_is_uniform():
    freq = _frequencies(_one_of([1.0, 0.0, 30.0, 4.0], trained=[False] * 4), 4)
    _assert_close_to(freq, np.full(4, 0.25))


def test_never_trained_channels_get_the_largest_norm():
    # w = [1, 3, 3, 3]: channels 1 and 3 were never trained and take the largest trained norm, 3
    freq = _frequencies(_one_of([1.0, 0.0, 3.0, 50.0], trained=[True, False, True, False]), 4)
    _assert_close_to(freq, np.array([1, 3, 3, 3]) / 10)


def test_zero_norm_channels_come_last():
    """Budget for two: the positive channel always, one of the zero-norm ones uniformly."""
    freq = _frequencies(lambda rng: select_gradnorm(np.array([0.0, 5.0, 0.0, 0.0]), np.ones(4, bool), np.ones(4), 2, rng), 4, 2000)
    assert freq[1] == 1.0
    _assert_close_to(freq[[0, 2, 3]], np.full(3, 1 / 3), 2000)


def test_pool_keeps_selections_in_the_top_layers():
    # per-parameter layer norms: A = sqrt(3^2 + 4^2) / 20 = 0.25, B = sqrt(3) / 3 = 0.577, C = sqrt(0.03) / 3 = 0.058
    norms = np.array([3.0, 4.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1])
    costs = np.array([10, 10, 1, 1, 1, 1, 1, 1])
    sizes = [2, 3, 3]
    trained = np.ones(8, bool)
    layer_b, layers_ab = np.array([0, 0, 1, 1, 1, 0, 0, 0], bool), np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    seen = np.zeros(8, bool)
    for seed in range(200):
        rng = np.random.default_rng(seed)
        one = select_gradnorm(norms, trained, costs, 12, rng, layer_sizes=sizes, pool_layers=1)
        two = select_gradnorm(norms, trained, costs, 12, rng, layer_sizes=sizes, pool_layers=2)
        assert not (one & ~layer_b).any() and not (two & ~layers_ab).any()
        assert one.sum() == 3  # the whole pool fits: backfill takes it all
        seen |= two
    assert np.array_equal(seen, layers_ab)  # every pooled channel is reachable
    # first epoch: no gradient information, no pool
    first = np.zeros(8, bool)
    for seed in range(200):
        first |= select_gradnorm(norms, trained, costs, 12, np.random.default_rng(seed), True, sizes, 1)
    assert first.all()


def test_fisher_samples_in_proportion_to_fisher_per_parameter():
    # budget 4 fits exactly one channel whatever is drawn first; score = fisher / cost = [0.5, 2/3, 0, 1.5]
    fisher, costs = np.array([1.0, 2.0, 0.0, 6.0]), np.array([2, 3, 3, 4])
    freq = _frequencies(lambda rng: select_fisher(fisher, costs, 4, rng), 4)
    assert np.all(freq.sum() == 1.0)
    _assert_close_to(freq, np.array([0.5, 2 / 3, 0.0, 1.5]) / (8 / 3))


def test_fisher_zero_scores_come_last_in_random_order():
    freq = _frequencies(lambda rng: select_fisher(np.array([0.0, 0.0, 9.0, 0.0]), np.ones(4), 2, rng), 4, 2000)
    assert freq[2] == 1.0
    _assert_close_to(freq[[0, 1, 3]], np.full(3, 1 / 3), 2000)


def test_deterministic_for_a_seed():
    rng0 = np.random.default_rng(5)
    norms, fisher, costs = rng0.random(50), rng0.random(50), rng0.integers(1, 9, 50)
    trained = rng0.random(50) < 0.5

    def both(seed):
        rng = np.random.default_rng(seed)
        return select_gradnorm(norms, trained, costs, 60, rng), select_fisher(fisher, costs, 60, rng)

    a, b = both(3), both(3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    others = [both(s) for s in range(4, 10)]
    assert any(not np.array_equal(a[0], o[0]) for o in others) and any(not np.array_equal(a[1], o[1]) for o in others)


def test_running_norm_ema_by_hand():
    state = RunningNorm(3)  # decay 0.5
    state.update(np.array([2.0, 4.0, 8.0]))
    assert state.norm.tolist() == [2.0, 4.0, 8.0]  # first measurement taken as is
    state.update(np.array([4.0, 0.0, 8.0]))
    assert state.norm.tolist() == [3.0, 2.0, 8.0]
    state.update(np.array([1.0, 2.0, 0.0]), measured=np.array([True, False, True]))
    assert state.norm.tolist() == [2.0, 2.0, 4.0]
    slow = RunningNorm(2, decay=0.75)
    slow.update(np.array([0.0, 4.0]), measured=np.array([False, True]))
    slow.update(np.array([8.0, 8.0]))
    assert slow.norm.tolist() == [8.0, 5.0]  # channel 0 measured for the first time; channel 1: 0.75*4 + 0.25*8
    state.mark_trained(np.array([False, True, False]))
    state.mark_trained(np.array([True, False, False]))
    assert state.trained_ever.tolist() == [True, True, False]
    with pytest.raises(NeqError):
        RunningNorm(3, decay=1.0)
    with pytest.raises(NeqError):
        state.update(np.array([1.0, np.nan, 0.0]))


def test_running_norm_checkpoint_resumes_bit_identically():
    rng = np.random.default_rng(1)
    epochs = [(rng.random(20) * 3, rng.random(20) < 0.4) for _ in range(4)]
    costs = rng.integers(1, 5, 20)

    def run(state, select_rng, part):
        masks = []
        for norms, measured in part:
            state.update(norms, measured)
            selected = select_gradnorm(state.norm, state.trained_ever, costs, 15, select_rng)
            state.mark_trained(selected)
            masks.append(selected)
        return masks

    straight = RunningNorm(20, decay=0.3)
    masks = run(straight, np.random.default_rng(7), epochs)
    first = RunningNorm(20, decay=0.3)
    select_rng = np.random.default_rng(7)
    resumed_masks = run(first, select_rng, epochs[:2])
    buffer = io.BytesIO()
    np.savez(buffer, **first.to_arrays())
    buffer.seek(0)
    with np.load(buffer) as z:
        resumed = RunningNorm.from_arrays({k: z[k] for k in z.files})
    resumed_masks += run(resumed, select_rng, epochs[2:])
    for name, value in straight.to_arrays().items():
        assert np.array_equal(resumed.to_arrays()[name], value), name
    assert all(np.array_equal(a, b) for a, b in zip(masks, resumed_masks))
    assert resumed.decay == 0.3 and resumed.norm.dtype == np.float64


def test_user_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(NeqError, match="layer_sizes"):
        select_gradnorm(np.ones(4), np.ones(4, bool), np.ones(4), 2, rng, pool_layers=1)
    with pytest.raises(NeqError, match="layer_sizes"):
        select_gradnorm(np.ones(4), np.ones(4, bool), np.ones(4), 2, rng, layer_sizes=[2, 1], pool_layers=1)
    with pytest.raises(NeqError, match="non-finite"):
        select_fisher(np.array([1.0, np.inf]), np.ones(2), 1, rng)
    with pytest.raises(NeqError, match="one per neuron"):
        select_fisher(np.ones(3), np.ones(2), 1, rng)
