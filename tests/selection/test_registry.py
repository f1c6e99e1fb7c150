"""The selector registry: every entry runs and keeps its budget, the CLI and compare read it, method
variants parse and label, phi flat against spatial, and the report's paired comparisons."""

from __future__ import annotations

import numpy as np
import pytest
from support import cli

from onnx_neq.errors import NeqError
from onnx_neq.results.plan import method_label, parse_method
from onnx_neq.selection.cost_model import CostModel
from onnx_neq.selection.registry import SELECTORS, SelectionInputs
from onnx_neq.selection.velocity import cosine_distance


def _inputs(epoch, budget, rng, **extra) -> SelectionInputs:
    sizes = [4, 8, 6]
    per_neuron = np.repeat([27, 9, 16], sizes).astype(np.int64)
    model = CostModel("params", per_neuron, np.repeat(np.arange(3), sizes), np.zeros(4, np.int64))
    n = per_neuron.size
    stats = dict(
        velocity=rng.standard_normal(n),
        su_mask=np.arange(n) % 3 == 0,
        gradient_norms=rng.random(n),
        trained_ever=rng.random(n) < 0.5,
        fisher=rng.random(n),
    )
    stats.update(extra)
    options = {"eps": 0.5, "gradnorm_pool": 0}
    return SelectionInputs(epoch, model, budget, per_neuron.astype(float), rng, False, sizes, options=options, **stats)


@pytest.mark.parametrize("name", list(SELECTORS))
def test_every_selector_runs_and_keeps_its_budget(name, rng):
    spec = SELECTORS[name]
    for epoch in range(3):
        for budget in (27, 100, 250):
            inputs = _inputs(epoch, budget, rng)
            selected = spec.select(inputs)
            assert selected.dtype == bool and selected.shape == (18,)
            if spec.budgeted and name != "su":
                assert inputs.model.cost(selected) <= budget
    assert spec.summary and all(isinstance(o, str) for o in spec.options)


def test_registry_entries_by_hand(rng):
    inputs = _inputs(1, 54, rng, velocity=np.array([0.0] * 17 + [27.0 * 9]))
    # velocity: |v|/cost puts neuron 17 (cost 16) first, then index order: neuron 0 (27); 16 + 27 <= 54 < 16 + 27 + 27
    assert np.flatnonzero(SELECTORS["velocity"].select(inputs)).tolist() == [0, 17]
    assert SELECTORS["full"].select(inputs).all()
    assert np.array_equal(SELECTORS["su"].select(inputs), inputs.su_mask)
    np.testing.assert_array_equal(SELECTORS["neq"].select(inputs), np.abs(inputs.velocity) > 0.5)


def test_train_and_compare_offer_every_registered_selector():
    result = cli("train", "--help", timeout=120)
    choices = result.stdout.split("--selector [")[1].split("]")[0].split("|")
    assert choices == list(SELECTORS)
    for name in SELECTORS:
        assert parse_method(name) == (name, {})


def test_method_variants_parse_and_label():
    assert parse_method("velocity[phi=flat,rank_cost=authors]") == ("velocity", {"phi": "flat", "rank_cost": "authors"})
    assert parse_method("gradnorm[gradnorm_pool=3]") == ("gradnorm", {"gradnorm_pool": 3})
    with pytest.raises(NeqError, match="unknown method"):
        parse_method("velocityy")
    with pytest.raises(NeqError, match="variants are"):
        parse_method("velocity[lr=3]")
    assert method_label("velocity", {"phi": "flat", "rank_cost": "exact", "cost": None}) == "velocity[phi=flat]"
    assert method_label("random", {"phi": "flat", "cost": "compute"}) == "random[cost=compute]"  # phi is no option of random
    assert method_label("velocity", {"phi": "spatial", "cost": "params"}) == "velocity"


def test_compare_plans_variants_and_five_seeds(tiny_artifacts, tmp_path):
    from onnx_neq.results.compare import CompareConfig, plan

    config = CompareConfig(data=["digits@0-4"], out=str(tmp_path), methods=["velocity[phi=flat]", "full"], budget_ratios=[0.1, 0.3])
    runs = plan(config, lambda data: str(tiny_artifacts))
    assert len(runs) == 5 * (2 + 1)
    flat = [r for r in runs if r.config.phi == "flat"]
    assert len(flat) == 10 and all(r.config.selector == "velocity" and "velocity-phi_flat-" in r.path.name for r in flat)
    assert sorted({r.config.seed for r in runs}) == [0, 1, 2, 42, 100]


def _hand_phi_flat(current, previous) -> np.ndarray:
    out = []
    for c in range(current.shape[1]):
        a, b = current[:, c].ravel(), previous[:, c].ravel()
        out.append(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return np.array(out)


def test_phi_flat_against_spatial(rng):
    """One image: the two are the same cosine. Several images on 1x1 maps: spatial only counts sign
    flips (a multiple of 2/N), flat is the cosine over the images, computed by hand."""
    big_now, big_before = rng.standard_normal((1, 5, 4, 4)), rng.standard_normal((1, 5, 4, 4))
    np.testing.assert_allclose(cosine_distance(big_now, big_before, "flat"), cosine_distance(big_now, big_before, "spatial"), rtol=1e-12)
    before = rng.standard_normal((6, 5, 1, 1))
    now = before * rng.uniform(0.2, 3.0, before.shape)  # magnitudes change, signs do not
    now[:2, 0] *= -1  # channel 0: two of six images flip sign
    spatial, flat = cosine_distance(now, before, "spatial"), cosine_distance(now, before, "flat")
    np.testing.assert_allclose(spatial, [2 * 2 / 6, 0, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(flat, _hand_phi_flat(now, before), rtol=1e-10)
    assert (flat[1:] > 1e-3).all()  # flat sees the magnitude changes spatial cannot
    # maps larger than 1x1 with several images: both measure change; they differ, neither is quantized
    now4, before4 = rng.standard_normal((6, 5, 3, 3)), rng.standard_normal((6, 5, 3, 3))
    np.testing.assert_allclose(cosine_distance(now4, before4, "flat"), _hand_phi_flat(now4, before4), rtol=1e-10)


def test_paired_section_of_the_report():
    from onnx_neq.results.report import RunSummary, results_markdown

    runs = []
    for seed, (v, r) in enumerate([(0.80, 0.70), (0.82, 0.71), (0.79, 0.75), (0.90, 0.60), (0.85, 0.80)]):
        for method, top1 in (("velocity", v), ("random", r)):
            runs.append(RunSummary(f"/r/{method}{seed}", "digits", method, 0.1, "10.0%", seed, 1, top1, top1, 0.1, 2, [top1]))
    text = results_markdown(runs)
    assert "| velocity vs random |" in text.replace("**", "")
    row = next(line for line in text.splitlines() if line.replace("**", "").startswith("| velocity vs random"))
    assert "5/0/0" in row and "0.062" in row  # five wins; exact two-sided Wilcoxon p = 2/32
