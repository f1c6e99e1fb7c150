"""Selectors and velocity alone: numpy in, masks out, against references written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnx_neq.selection.cost_model import greedy_fill, params_model
from onnx_neq.selection.selectors import SU_SCHEMES, select_neq, select_su, velocity_ranking
from onnx_neq.selection.velocity import VelocityState, cosine_distance


def _reference_phi(current: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """1 - cosine with torch, then ALGORITHM.md's zero-vector convention applied by hand."""
    a = torch.from_numpy(current).double().flatten(2)
    b = torch.from_numpy(previous).double().flatten(2)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=2, eps=1e-300)
    za, zb = a.norm(dim=2) == 0, b.norm(dim=2) == 0
    cos = torch.where(za & zb, torch.ones_like(cos), torch.where(za ^ zb, torch.zeros_like(cos), cos))
    return (1 - cos).mean(dim=0).numpy()


def _reference_velocities(phis: list[np.ndarray], mu: float) -> list[np.ndarray]:
    """The authors' recurrence, one neuron at a time, in plain Python."""
    out = []
    n = len(phis[0])
    prev_phi, s = [0.0] * n, [0.0] * n
    for phi in phis:
        r_t = []
        for c in range(n):
            d = prev_phi[c] - phi[c]
            r = s[c] + d
            s[c] = mu * r - d
            r_t.append(r)
        prev_phi = list(phi)
        out.append(np.array(r_t))
    return out


def test_cosine_distance_matches_torch_with_zero_conventions(rng):
    prev = rng.standard_normal((4, 6, 3, 3))
    cur = prev + 0.3 * rng.standard_normal((4, 6, 3, 3))
    prev[:, 1] = 0  # channel 1: zero before and after -> cos 1 -> phi 0
    cur[:, 1] = 0
    cur[:, 2] = 0  # channel 2: zero now, not before -> cos 0 -> phi 1
    cur[:, 3] = -prev[:, 3]  # channel 3: flipped -> cos -1 -> phi 2
    phi = cosine_distance(cur, prev)
    np.testing.assert_allclose(phi, _reference_phi(cur, prev), rtol=1e-12, atol=1e-12)
    assert phi[1] == 0 and phi[2] == 1 and phi[3] == pytest.approx(2)
    assert not np.isnan(phi).any()


@pytest.mark.parametrize("mu", [0.5, 0.9])
def test_code_recurrence_matches_reference(mu, rng):
    phis = [rng.random(7) for _ in range(6)]
    state = VelocityState(7, mu=mu)
    for phi, expected in zip(phis, _reference_velocities(phis, mu)):
        np.testing.assert_allclose(state.update(phi), expected, rtol=1e-12)


def test_textbook_recurrence_agrees_with_code_only_for_two_epochs(rng):
    phis = [rng.random(5) for _ in range(3)]
    code, book = VelocityState(5), VelocityState(5, recurrence="textbook")
    v = [(code.update(p), book.update(p)) for p in phis]
    np.testing.assert_allclose(np.abs(v[0][0]), np.abs(v[0][1]))
    np.testing.assert_allclose(np.abs(v[1][0]), np.abs(v[1][1]))
    assert not np.allclose(np.abs(v[2][0]), np.abs(v[2][1]))


def greedy(order, costs, budget, backfill=False):
    return greedy_fill(order, params_model(costs), budget, backfill)


def test_greedy_stops_at_first_misfit_or_backfills():
    costs = np.array([5, 3, 9, 1, 2])
    order = np.array([0, 2, 1, 3, 4])
    assert greedy(order, costs, 10).tolist() == [True, False, False, False, False]  # 5, then 9 does not fit: stop
    assert greedy(order, costs, 10, backfill=True).tolist() == [True, True, False, True, False]  # 5 + 3 + 1 (+2 would be 11)
    assert greedy(order, costs, 100).all()


def test_velocity_selection_ranks_by_velocity_per_parameter():
    costs = np.array([10, 1, 4, 4])
    velocity = np.array([-5.0, 0.9, 0.2, 2.0])  # |v|/cost: 0.5, 0.9, 0.05, 0.5 -> order 1, 0, 3, 2
    assert greedy(velocity_ranking(velocity, costs), costs, 11).tolist() == [True, True, False, False]
    assert greedy(velocity_ranking(velocity, costs), costs, 15).tolist() == [True, True, False, True]


def test_random_selection_is_reproducible_for_a_seed():
    costs = np.random.default_rng(0).integers(1, 50, 300)
    from onnx_neq.selection.registry import SELECTORS, SelectionInputs

    def draw(seed):
        inputs = SelectionInputs(0, params_model(costs), 2000, costs, np.random.default_rng(seed))
        return SELECTORS["random"].select(inputs)

    a, b, c = draw([7, 1]), draw([7, 1]), draw([8, 1])
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert costs[a].sum() <= 2000


def test_neq_freezes_slow_neurons():
    assert select_neq(np.array([1e-4, -2e-3, 5e-3, 0.0]), 1e-3).tolist() == [False, True, True, False]


def test_su_keeps_largest_norm_channels():
    norms = [np.array([1.0, 3.0, 2.0, 0.5]), np.array([4.0, 1.0])]
    assert select_su(norms, {0: 0.5}).tolist() == [False, True, True, False, False, False]
    assert select_su(norms, {0: 0.25, 1: 1.0}).tolist() == [False, True, False, False, True, True]


def test_su_scheme_1_on_mobilenet_v2_updates_192312_parameters(tmp_path):
    """Scheme 1 by hand: conv 36, 39 (1x1 expand 96->576, 160->960), 41, 42, 45, 48, 49 ..."""
    from onnx_neq.export import export
    from onnx_neq.graph.prepare import prepare

    export("mobilenet_v2", tmp_path / "m.onnx", resolution=32)
    manifest = prepare(tmp_path / "m.onnx", tmp_path / "art").manifest
    layers = manifest.layers
    costs = np.concatenate([np.full(l.out_channels, l.neuron_cost) for l in layers])
    norms = [np.random.default_rng(i).random(l.out_channels) for i, l in enumerate(layers)]
    selected = select_su(norms, SU_SCHEMES[1])
    # hand count: 36 = features.12 expand 96->576 (all), 39 = features.13 expand 96->576 (all),
    # 40 = its depthwise (none), 41 = its project 576->160 (1/4), 42 = features.14 expand 160->960 (1/8),
    # 45 = features.15 expand (1/8), 48 = features.16 expand (1/8), 49 = its depthwise 960 x 3x3 (1/8)
    hand = 576 * 96 + 576 * 96 + 0 + 40 * 576 + 120 * 160 + 120 * 160 + 120 * 160 + 120 * 9
    assert hand == 192_312
    assert int(costs[selected].sum()) == 192_312


def test_one_su_picker_counts_batchnorm_with_bn_update_selected(tiny_artifacts):
    """su_selection's scheme cost by hand: sum over listed layers of int(C_out * ratio) * (C_in*k*k [+2 BN])."""
    from onnx_neq.manifest import read_manifest
    from onnx_neq.selection.cost_model import cost_model
    from onnx_neq.selection.schemes import nearest_builtin_scheme, su_selection

    manifest = read_manifest(tiny_artifacts)
    manifest.layers = [manifest.layers[i % len(manifest.layers)] for i in range(52)]  # 52 convs: the built-in schemes apply
    norms = [np.arange(layer.out_channels, dtype=float) for layer in manifest.layers]

    def hand(scheme, bn):
        return sum(
            int(manifest.layers[i].out_channels * r) * (manifest.layers[i].neuron_cost + (2 if bn and manifest.layers[i].bn else 0))
            for i, r in scheme.items()
        )

    for bn_update in ("always", "selected"):
        model = cost_model("params", manifest, bn_update)
        costs = {k: hand(s, bn_update == "selected") for k, s in SU_SCHEMES.items()}
        for k, cost in costs.items():
            assert model.cost(select_su(norms, SU_SCHEMES[k])) == cost
            chosen = su_selection(None, manifest, norms, model, cost)
            assert model.cost(chosen) == max(c for c in costs.values() if c <= cost)
            assert nearest_builtin_scheme(manifest, model, cost) == min((j for j in costs if costs[j] == cost), default=k)
        assert np.array_equal(su_selection("3", manifest, norms, model, None), select_su(norms, SU_SCHEMES[3]))
