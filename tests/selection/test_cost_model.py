"""Cost models and the reach-aware greedy fill, against counts done by hand here."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_neq.errors import NeqError
from onnx_neq.manifest import InputSpec, Layer, Manifest
from onnx_neq.selection.cost_model import cost_model, greedy_fill, parse_amount


def _layer(name, c_in, c_out, k, groups, hw_in, hw_out, bias=False, bn=True) -> Layer:
    kind = "depthwise" if groups == c_in == c_out and groups > 1 else "conv"
    return Layer(
        name, name, name + ".w", name + ".b" if bias else None, kind, c_out, c_in, groups, [k, k],
        (c_in // groups) * k * k + (1 if bias else 0), name + ".mask", name + ".tap",
        [c_in, hw_in, hw_in], [c_out, hw_out, hw_out], [name + ".g", name + ".beta"] if bn else [],
    )  # fmt: skip


def _manifest(optimizer="sgd") -> Manifest:
    layers = [
        _layer("stem", 3, 4, 3, 1, 8, 4),  # stride 2: 8x8 -> 4x4
        _layer("dw", 4, 4, 3, 4, 4, 4),  # depthwise 3x3, 4x4 -> 4x4
        _layer("pw", 4, 6, 1, 1, 4, 2, bias=True, bn=False),  # 1x1 stride 2: 4x4 -> 2x2
    ]
    return Manifest(
        "m.onnx", optimizer, InputSpec("x", [None, 3, 8, 8], [0, 0, 0], [1, 1, 1]), "y", "logits", "loss", 2,
        14, sum(lay.params for lay in layers), 14, 0, 0, [], [], layers,
    )  # fmt: skip


def test_compute_costs_by_hand():
    model = cost_model("compute", _manifest(), "selected")
    # weight-gradient MACs per output channel: (C_in/groups)*k*k*H_out*W_out
    stem, dw, pw = 3 * 9 * 16, 1 * 9 * 16, 4 * 1 * 4
    np.testing.assert_array_equal(model.per_neuron, [stem] * 4 + [dw] * 4 + [pw] * 6)
    # reaching a layer: the input-gradient MACs (= forward MACs) of every conv after it
    np.testing.assert_array_equal(model.reach, [4 * dw + 6 * pw, 6 * pw, 0, 0])
    selected = np.zeros(14, bool)
    selected[[1, 9]] = True  # one stem channel, one pw channel
    assert model.cost(selected) == stem + pw + 4 * dw + 6 * pw
    assert model.total == 4 * stem + 4 * dw + 6 * pw + 4 * dw + 6 * pw


def test_memory_costs_by_hand():
    for optimizer, states in (("sgd", 0), ("adamw", 2)):
        model = cost_model("memory", _manifest(optimizer), "selected", batch_size=8)
        params = [27 + 2] * 4 + [9 + 2] * 4 + [4 + 1] * 6  # + BatchNorm scale and bias where a BN follows
        np.testing.assert_array_equal(model.per_neuron, 4 * (1 + states) * np.array(params))
        inputs = [4 * 8 * 3 * 64, 4 * 8 * 4 * 16, 4 * 8 * 4 * 16]  # float32 inputs of the batch, stem on
        np.testing.assert_array_equal(model.reach, [sum(inputs), sum(inputs[1:]), inputs[2], 0])


def test_params_model_is_the_parameter_count():
    for bn_update, extra in (("always", 0), ("selected", 2)):
        model = cost_model("params", _manifest(), bn_update)
        np.testing.assert_array_equal(model.per_neuron, [27 + extra] * 4 + [9 + extra] * 4 + [5] * 6)
        assert not model.reach.any()


def test_greedy_fill_charges_reach_once_by_the_shallowest_layer():
    model = cost_model("compute", _manifest(), "selected")
    pw, dw = model.per_neuron[8], model.per_neuron[4]
    # order: two pw channels (reach 0), then a dw channel, which adds the reach down to dw: reach[1]
    order = np.array([8, 9, 4, 0])
    budget = 2 * pw + dw + int(model.reach[1])
    selected = greedy_fill(order, model, budget)
    assert selected[[8, 9, 4]].all() and selected.sum() == 3
    assert model.cost(selected) == budget
    # one less and the dw channel does not fit, nor the stem one after it (reach is skipped past, not a stop)
    selected = greedy_fill(order, model, budget - 1)
    assert selected[[8, 9]].all() and selected.sum() == 2


@pytest.mark.parametrize("kind", ["params", "compute", "memory"])
def test_fill_never_exceeds_the_budget(kind, rng):
    model = cost_model(kind, _manifest(), "selected", 4)
    for _ in range(200):
        budget = int(rng.integers(1, model.total + 1))
        for backfill in (False, True):
            selected = greedy_fill(rng.permutation(14), model, budget, backfill)
            assert model.cost(selected) <= budget


def test_parse_amount():
    assert parse_amount("256KB", "memory") == 256 * 1024
    assert parse_amount("1.5MB", "memory") == 1.5 * 1024**2
    assert parse_amount("4096", "memory") == 4096
    assert parse_amount("120M", "compute") == 120_000_000
    assert parse_amount("2.5G", "compute") == 2_500_000_000
    with pytest.raises(NeqError, match="256KB"):
        parse_amount("lots", "memory")
    with pytest.raises(NeqError, match="above 0"):
        parse_amount("0", "compute")


def test_shapes_needed_for_compute():
    manifest = _manifest()
    manifest.layers[1].output_shape = None
    with pytest.raises(NeqError, match="--input-shape"):
        cost_model("compute", manifest)
    cost_model("params", manifest)  # needs no shapes
