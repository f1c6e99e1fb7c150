"""Entropy-Guided Pruning against numbers worked out by hand (in the comments), not by the code under test."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_neq.selection.egp import (
    LayerEntropy,
    batch_entropy,
    egp_amounts,
    egp_masks,
    layer_stats,
    magnitude_masks,
    on_fraction,
    prune_smallest,
    removable,
    round_amount,
    rounds_for,
    schedule_sparsity,
    sparsity,
)

H_QUARTER = 0.8112781244591328  # H(0.25) = 0.25 * 2 + 0.75 * log2(4/3) = 0.5 + 0.75 * 0.4150374993 bits


# entropy -----------------------------------------------------------------------------------------
def test_on_fraction_pools_samples_and_positions():
    x = np.zeros((2, 3, 2, 2))
    x[0, 0] = [[1.0, -1.0], [0.0, 2.0]]  # channel 0: ON at 2 of 4 positions in sample 0
    x[1, 0] = [[-3.0, 0.5], [-0.1, -2.0]]  # and 1 of 4 in sample 1 -> 3 / 8
    x[:, 1] = 0.25  # channel 1: every entry > 0 -> 1
    x[0, 2] = [[0.0, -1.0], [0.0, -5.0]]  # channel 2: only 0 and negatives (0 is OFF) -> 0
    x[1, 2] = -1e-3
    np.testing.assert_array_equal(on_fraction(x), [0.375, 1.0, 0.0])


def test_on_fraction_of_a_dense_activation():
    x = np.array([[1.0, -1.0], [2.0, 3.0], [-1.0, 4.0], [0.0, 5.0]])  # (N=4, C=2): channel 0 ON in 2 of 4
    np.testing.assert_array_equal(on_fraction(x), [0.5, 0.75])


def test_batch_entropy_excludes_saturated_channels():
    # p = 0.5 -> 1 bit; p = 0.25 -> 0.811278 bits; p = 1 is not in K -> H = (1 + 0.811278) / 2
    assert batch_entropy(np.array([0.5, 0.25, 1.0])) == pytest.approx(0.9056390622295664, abs=1e-12)
    assert batch_entropy(np.array([0.25])) == pytest.approx(H_QUARTER, abs=1e-12)
    assert batch_entropy(np.array([0.0, 1.0, 1.0])) == 0.0


def test_saturated_layer_has_zero_entropy_and_is_removable():
    layer = LayerEntropy()
    for _ in range(2):
        x = np.zeros((3, 2, 2, 2))
        x[:, 0] = 0.7  # channel 0 ON everywhere
        x[:, 1] = -0.7  # channel 1 OFF everywhere
        assert layer.add(x) == 0.0
    assert layer.value == 0.0
    assert layer.removable and removable(layer)
    np.testing.assert_array_equal(layer.always_on, [True, False])
    np.testing.assert_array_equal(layer.always_off, [False, True])


def test_layer_entropy_averages_batches():
    layer = LayerEntropy()
    assert layer.value == 0.0 and not removable(layer)
    # batch 1 (N=4, C=3): p = [0.5, 1, 0] -> H = 1 bit
    assert layer.add(np.array([[1.0, 1, 0], [-1, 2, -1], [1, 3, -2], [-1, 4, 0]])) == pytest.approx(1.0)
    # batch 2: p = [0.25, 1, 0] -> H = 0.811278
    assert layer.add(np.array([[1.0, 1, 0], [-1, 2, 0], [-1, 3, -2], [-1, 4, 0]])) == pytest.approx(H_QUARTER)
    assert layer.batches == 2
    assert layer.value == pytest.approx((1.0 + H_QUARTER) / 2, abs=1e-12)  # 0.905639
    np.testing.assert_array_equal(layer.always_on, [False, True, False])
    np.testing.assert_array_equal(layer.always_off, [False, False, True])
    assert not layer.removable  # channel 0 varies


def test_zero_entropy_is_not_enough_to_remove():
    layer = LayerEntropy()
    layer.add(np.array([[1.0, -1.0], [2.0, -2.0]]))  # p = [1, 0]
    layer.add(np.array([[-1.0, -1.0], [-2.0, -2.0]]))  # p = [0, 0]: channel 0 all ON, then all OFF
    assert layer.value == 0.0
    np.testing.assert_array_equal(layer.always_on, [False, False])
    np.testing.assert_array_equal(layer.always_off, [False, True])
    assert not removable(layer)
    with pytest.raises(ValueError):
        layer.add(np.ones((2, 3)))  # 3 channels, earlier batches had 2


# schedule ----------------------------------------------------------------------------------------
def test_schedule():
    assert schedule_sparsity(4) == [0.5, 0.75, 0.875, 0.9375]
    assert schedule_sparsity(2, share=0.25) == [0.25, 0.4375]  # 1 - 0.75, 1 - 0.5625
    assert rounds_for(0.0) == 0
    assert rounds_for(0.5) == 1
    assert rounds_for(0.75) == 2
    assert rounds_for(0.984375) == 6  # 1 - 1/64
    assert rounds_for(0.9) == 4  # 0.875 < 0.9 <= 0.9375
    assert rounds_for(0.75 + 5e-10) == 2  # within the tolerance
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            rounds_for(bad)


def test_round_amount_floors():
    assert round_amount(101) == 50  # 50.5
    assert round_amount(7, share=0.25) == 1  # 1.75
    assert round_amount(0) == 0


# EGP split ---------------------------------------------------------------------------------------
def test_egp_amounts_with_one_cap():
    # I = H * mean|w|: A 0.1 * 0.1 = 0.01, B 0.5 * 0.2 = 0.1, C 1.0 * 0.1 = 0.1, D H = 0 (not eligible)
    # pass 1: T = 0.21, r = [21, 2.1, 2.1], r - max = [0, -18.9, -18.9], e^-18.9 = 6.2e-9
    #   a_A = 100 / (1 + 1.24e-8) ~ 100 > nnz_A = 10 -> capped at 10; P = 90, T = 0.2
    # pass 2: r = [2, 2] -> shares 0.5, 0.5 -> a = 45, 45 <= 60, 50: no cap
    amounts = egp_amounts(100, np.array([0.1, 0.5, 1.0, 0.0]), np.array([0.1, 0.2, 0.1, 0.5]), np.array([10, 60, 50, 80]))
    np.testing.assert_array_equal(amounts, [10, 45, 45, 0])
    assert amounts.sum() == 100


def test_egp_amounts_low_importance_gets_the_most_and_remainders_are_kept():
    # I = [0.01, 0.1] -> T = 0.11, r = [11, 1.1], e^-9.9 = 5.0e-5: a = [7 - 3.5e-4, 3.5e-4]
    # floors [6, 0] lose one unit; the larger fraction (layer 0: 0.99965) gets it -> [7, 0]
    np.testing.assert_array_equal(egp_amounts(7, np.array([0.1, 1.0]), np.array([0.1, 0.1]), np.array([100, 100])), [7, 0])


def test_egp_amounts_equal_layers_and_ties():
    # equal I: a = 10 / 3 = 3.333 each; floors [3, 3, 3]; the unit left goes to the first (equal fractions)
    amounts = egp_amounts(10, np.array([0.5, 0.5, 0.5]), np.array([0.2, 0.2, 0.2]), np.array([9, 9, 9]))
    np.testing.assert_array_equal(amounts, [4, 3, 3])


def test_egp_amounts_edge_cases():
    h, m = np.array([0.3, 0.0, 0.6]), np.array([0.5, 0.5, 0.0])
    # layer 1: zero entropy; layer 2: no weights left; everything goes to layer 0 (capped at its 4)
    np.testing.assert_array_equal(egp_amounts(3, h, m, np.array([4, 50, 0])), [3, 0, 0])
    np.testing.assert_array_equal(egp_amounts(500, h, m, np.array([4, 50, 0])), [4, 0, 0])
    # more than all eligible weights: every eligible layer emptied (equal I: 1000 / 2 = 500 > 5 and > 7)
    np.testing.assert_array_equal(egp_amounts(1000, np.array([1.0, 1.0]), np.array([0.1, 0.1]), np.array([5, 7])), [5, 7])
    np.testing.assert_array_equal(egp_amounts(0, np.array([1.0, 1.0]), np.array([0.1, 0.1]), np.array([5, 7])), [0, 0])
    with pytest.raises(ValueError):
        egp_amounts(3, np.array([1.0]), np.array([0.0]), np.array([5]))  # kept weights but mean |w| 0


# pruning -----------------------------------------------------------------------------------------
def test_prune_smallest_ties_and_no_revival():
    w = np.array([[0.5, -0.1, 0.3], [0.1, -0.3, 0.0]])
    before = w.copy()
    mask = np.array([[True, True, True], [True, True, False]])
    # kept |w| by flat index: 0:.5 1:.1 2:.3 3:.1 4:.3; 5 already pruned
    np.testing.assert_array_equal(prune_smallest(w, mask, 2), [[True, False, True], [False, True, False]])
    # third: the .3 tie goes to flat index 2 before 4
    np.testing.assert_array_equal(prune_smallest(w, mask, 3), [[True, False, False], [False, True, False]])
    np.testing.assert_array_equal(prune_smallest(w, mask, 0), mask)
    np.testing.assert_array_equal(prune_smallest(w, mask, 99), np.zeros((2, 3), bool))
    np.testing.assert_array_equal(mask, [[True, True, True], [True, True, False]])  # input mask untouched
    np.testing.assert_array_equal(w, before)  # weights untouched


def test_magnitude_masks_global_threshold():
    weights = {"a": np.array([0.4, -0.05, 0.2]), "b": np.array([[0.05, 0.3], [-0.01, 0.9]])}
    masks = {"a": np.ones(3, bool), "b": np.array([[True, True], [False, True]])}
    # kept |w|: a .4 .05 .2 | b .05 .3 (.01 pruned) .9 -> smallest three: a[1], b[0,0] (tie: layer a first), a[2]
    out = magnitude_masks(weights, masks, 3)
    np.testing.assert_array_equal(out["a"], [True, False, False])
    np.testing.assert_array_equal(out["b"], [[False, True], [False, True]])
    assert sparsity(out) == pytest.approx(4 / 7)  # a[1], a[2], b[0,0], b[1,0] of 7
    one = magnitude_masks(weights, masks, 1)
    np.testing.assert_array_equal(one["a"], [True, False, True])
    np.testing.assert_array_equal(one["b"], masks["b"])
    assert not magnitude_masks(weights, masks, 10)["b"].any()
    np.testing.assert_array_equal(weights["b"], [[0.05, 0.3], [-0.01, 0.9]])
    np.testing.assert_array_equal(masks["a"], [True, True, True])


def test_layer_stats_and_egp_masks():
    w = np.array([[1.0, -3.0], [2.0, 0.5]])
    assert layer_stats(w, np.array([[True, True], [False, True]])) == (3, 1.5)  # (1 + 3 + 0.5) / 3
    weights = {"a": np.array([0.4, 0.1, 0.3, 0.2]), "b": np.array([1.0, 4.0, 3.0, 2.0])}
    masks = {"a": np.ones(4, bool), "b": np.ones(4, bool)}
    # I_a = 1.0 * 0.25, I_b = 1.0 * 2.5; T = 2.75, r = [11, 1.1], e^-9.9 = 5.0e-5
    # a = [2 - 1e-4, 1e-4] -> floors [1, 0], the unit to a -> a prunes 0.1 and 0.2; b keeps all
    out = egp_masks(weights, masks, {"a": 1.0, "b": 1.0}, 2)
    np.testing.assert_array_equal(out["a"], [True, False, True, False])
    np.testing.assert_array_equal(out["b"], [True, True, True, True])
    np.testing.assert_array_equal(weights["a"], [0.4, 0.1, 0.3, 0.2])


def test_sparsity():
    assert sparsity({"a": np.array([True, False]), "b": np.array([False, False, True, True])}) == 0.5  # 3 of 6
    assert sparsity({}) == 0.0
