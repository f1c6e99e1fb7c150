"""The federated updates against hand computations (the numbers are worked out in the comments)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from onnx_neq.fleet.updates import ChannelUpdate, aggregate, channel_update, check_update, dense_update

F32 = np.float32


def _rows(indices: list[int], values: list) -> tuple[np.ndarray, np.ndarray]:
    return np.array(indices, np.int32), np.array(values, F32)


def _global() -> dict[str, np.ndarray]:
    """conv weight [4, 2, 1, 1] and bias [4], classifier [3, 4] and [3]; values not exact in binary (0.1 steps)."""
    return {
        "conv.weight": (np.arange(8, dtype=F32) * F32(0.1) + F32(0.3)).reshape(4, 2, 1, 1),
        "conv.bias": np.array([0.1, 0.2, 0.3, 0.7], F32),
        "fc.weight": np.arange(12, dtype=F32).reshape(3, 4) * F32(0.1),
        "fc.bias": np.array([0.1, 0.2, 0.3], F32),
    }


def _clients() -> list[ChannelUpdate]:
    a = ChannelUpdate(  # 1 example; channels 0, 1; fc.weight and fc.bias whole
        examples=1,
        rows={"conv.weight": _rows([0, 1], [[[[1]], [[2]]], [[[3]], [[4]]]]), "conv.bias": _rows([0, 1], [10, 20])},
        whole={"fc.weight": np.full((3, 4), 1, F32), "fc.bias": np.array([1, 2, 3], F32)},
    )
    b = ChannelUpdate(  # 3 examples; channels 1, 2 (given in the order 2, 1); fc.bias whole
        examples=3,
        rows={"conv.weight": _rows([2, 1], [[[[7]], [[8]]], [[[5]], [[6]]]]), "conv.bias": _rows([2, 1], [40, 30])},
        whole={"fc.bias": np.array([5, 6, 7], F32)},
    )
    c = ChannelUpdate(  # 4 examples; channel 0 only, weight only (its bias did not train); fc.weight whole
        examples=4,
        rows={"conv.weight": _rows([0], [[[[9]], [[10]]]])},
        whole={"fc.weight": np.full((3, 4), 6, F32)},
    )
    return [a, b, c]


def test_aggregate_weighted_per_channel_by_hand():
    glob = _global()
    before = {k: v.copy() for k, v in glob.items()}
    clients = _clients()
    sent = [{k: (i.copy(), v.copy()) for k, (i, v) in u.rows.items()} for u in clients]
    new = aggregate(glob, clients)

    w = new["conv.weight"].reshape(4, 2)
    # channel 0: a (1) and c (4): ([1, 2] + 4 [9, 10]) / 5 = [37, 42] / 5 = [7.4, 8.4]
    np.testing.assert_allclose(w[0], [7.4, 8.4], rtol=1e-6)
    # channel 1: a (1) and b (3): ([3, 4] + 3 [5, 6]) / 4 = [18, 22] / 4 = [4.5, 5.5]
    np.testing.assert_allclose(w[1], [4.5, 5.5], rtol=1e-6)
    # channel 2: b alone: [7, 8]
    np.testing.assert_allclose(w[2], [7.0, 8.0], rtol=1e-6)
    # channel 3: nobody: the global rows, bit for bit
    assert np.array_equal(new["conv.weight"][3], glob["conv.weight"][3])
    # bias: channel 0 sent by a alone (c sent no bias): 10; channel 1: (20 + 3 * 30) / 4 = 110 / 4 = 27.5;
    # channel 2: 40; channel 3: global 0.7 (bit-identical)
    np.testing.assert_allclose(new["conv.bias"][:3], [10.0, 27.5, 40.0], rtol=1e-6)
    assert np.array_equal(new["conv.bias"][3:], glob["conv.bias"][3:])
    # fc.weight: a (1) all 1, c (4) all 6: (1 + 24) / 5 = 5
    np.testing.assert_allclose(new["fc.weight"], np.full((3, 4), 5.0), rtol=1e-6)
    # fc.bias: a (1) [1, 2, 3], b (3) [5, 6, 7]: [1 + 15, 2 + 18, 3 + 21] / 4 = [4, 5, 6]
    np.testing.assert_allclose(new["fc.bias"], [4.0, 5.0, 6.0], rtol=1e-6)

    assert all(v.dtype == F32 and v.shape == glob[k].shape for k, v in new.items())
    assert all(not np.shares_memory(new[k], glob[k]) for k in glob)
    assert all(np.array_equal(glob[k], before[k]) for k in glob)  # inputs untouched
    for update, rows in zip(clients, sent):
        assert all(np.array_equal(update.rows[k][0], i) and np.array_equal(update.rows[k][1], v) for k, (i, v) in rows.items())


def test_aggregate_without_updates_is_the_global():
    glob = _global()
    new = aggregate(glob, [])
    assert all(np.array_equal(new[k], glob[k]) and new[k] is not glob[k] for k in glob)


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(F32),  # 18 elements a row
        "conv.bias": rng.standard_normal(4).astype(F32),
        "conv2.weight": rng.standard_normal((5, 4, 1, 1)).astype(F32),  # 4 elements a row, no bias
        "fc.weight": rng.standard_normal((3, 4)).astype(F32),
        "fc.bias": rng.standard_normal(3).astype(F32),
    }


CHANNEL_PARAMS = {"conv.weight": "conv", "conv.bias": "conv", "conv2.weight": "conv2"}
WHOLE = ["fc.weight", "fc.bias"]


def _update(params: dict[str, np.ndarray], examples: int = 32) -> ChannelUpdate:
    masks = {"conv": np.array([0, 1, 0, 1]), "conv2": np.zeros(5, np.int64)}  # conv: channels 1, 3; conv2: none
    return channel_update(params, CHANNEL_PARAMS, masks, WHOLE, examples)


def test_channel_update_holds_the_selected_rows():
    params = _params()
    update = _update(params)
    assert update.examples == 32
    assert set(update.rows) == {"conv.weight", "conv.bias"}  # conv2 had no selected channel: absent
    assert set(update.whole) == {"fc.weight", "fc.bias"}
    for name in ("conv.weight", "conv.bias"):
        indices, values = update.rows[name]
        assert indices.dtype == np.int32 and indices.tolist() == [1, 3]
        assert values.dtype == F32 and np.array_equal(values, params[name][[1, 3]])
    for name in WHOLE:
        assert update.whole[name].dtype == F32 and np.array_equal(update.whole[name], params[name])
    before = {k: (i.copy(), v.copy()) for k, (i, v) in update.rows.items()}
    for p in params.values():
        p[...] = 0  # the update holds copies
    assert all(np.array_equal(update.rows[k][1], v) for k, (_, v) in before.items())

    # conv.weight: 2 rows x 18 x 4 B = 144, indices 2 x 4 = 8; conv.bias: 2 x 4 = 8, indices 8;
    # fc.weight 12 x 4 = 48; fc.bias 3 x 4 = 12: 144 + 8 + 8 + 8 + 48 + 12 = 228
    assert update.nbytes() == 228


def test_dense_update_sends_everything():
    params = _params()
    update = dense_update(params, list(params), 10)
    assert update.rows == {} and set(update.whole) == set(params)
    # 72 + 4 + 20 + 12 + 3 = 111 parameters x 4 B = 444
    assert update.nbytes() == 444


def test_channel_update_rejects_a_mask_of_the_wrong_size():
    params = _params()
    with pytest.raises(ValueError, match="mask"):
        channel_update(params, CHANNEL_PARAMS, {"conv": np.ones(3), "conv2": np.ones(5)}, WHOLE, 1)


def _with_rows(update: ChannelUpdate, name: str, indices: list[int], values: np.ndarray) -> ChannelUpdate:
    return replace(update, rows={**update.rows, name: (np.array(indices, np.int32), values)})


def _bad(update: ChannelUpdate) -> dict[str, tuple[ChannelUpdate, str]]:
    """Each broken update and a word its reason must contain."""
    row = update.rows["conv.weight"][1]
    nan = row.copy()
    nan[1, 0, 2, 2] = np.nan
    inf = update.whole["fc.bias"].copy()
    inf[0] = np.inf
    return {
        "row shape": (_with_rows(update, "conv.weight", [1, 3], row[:, :, :2]), "shape"),
        "nan": (_with_rows(update, "conv.weight", [1, 3], nan), "finite"),
        "inf whole": (replace(update, whole={**update.whole, "fc.bias": inf}), "finite"),
        "index out of range": (_with_rows(update, "conv.weight", [1, 4], row), "range"),
        "negative index": (_with_rows(update, "conv.weight", [-1, 3], row), "range"),
        "repeated index": (_with_rows(update, "conv.weight", [3, 3], row), "repeated"),
        "unknown name": (_with_rows(update, "conv9.weight", [1, 3], row), "unknown"),
        "examples 0": (replace(update, examples=0), "examples"),
        "whole shape": (replace(update, whole={**update.whole, "fc.bias": np.zeros(4, F32)}), "shape"),
        "whole dtype": (replace(update, whole={**update.whole, "fc.bias": update.whole["fc.bias"].astype(np.float64)}), "float32"),
        "rows and whole": (replace(update, whole={**update.whole, "conv.bias": np.zeros(4, F32)}), "both"),
    }


@pytest.mark.parametrize("case", list(_bad(_update(_params()))))
def test_check_update_rejects(case):
    params = _params()
    assert check_update(_update(params), params) is None  # the good one
    bad, word = _bad(_update(params))[case]
    reason = check_update(bad, params)
    assert reason is not None and word in reason


def test_aggregate_of_the_accepted_leaves_the_rejected_channels():
    glob = _params()
    masks = {"conv2": np.zeros(5)}
    good_a = channel_update(glob, CHANNEL_PARAMS, {**masks, "conv": np.array([1, 0, 0, 0])}, [], 1)
    good_a.rows["conv.bias"][1][:] = 2  # channel 0: 2 (1 example)
    good_b = channel_update(glob, CHANNEL_PARAMS, {**masks, "conv": np.array([1, 1, 0, 0])}, [], 3)
    good_b.rows["conv.bias"][1][:] = [6, 5]  # channel 0: 6 (3 examples), channel 1: 5
    bad = channel_update(glob, CHANNEL_PARAMS, {**masks, "conv": np.array([0, 0, 1, 1])}, ["fc.bias"], 5)
    bad.rows["conv.weight"][1][0, 0, 0, 0] = np.nan  # rejected: channels 2, 3 and fc.bias must stay global
    updates = [good_a, bad, good_b]
    accepted = [u for u in updates if check_update(u, glob) is None]
    assert accepted == [good_a, good_b]

    new = aggregate(glob, accepted)
    assert np.array_equal(new["conv.weight"][2:], glob["conv.weight"][2:])
    assert np.array_equal(new["conv.bias"][2:], glob["conv.bias"][2:])
    assert np.array_equal(new["fc.bias"], glob["fc.bias"])
    # channel 0: (1 x 2 + 3 x 6) / 4 = 20 / 4 = 5; channel 1: b alone, 5
    np.testing.assert_allclose(new["conv.bias"][:2], [5.0, 5.0], rtol=1e-6)
    # weights of channels 0, 1 were sent unchanged by every sender: their mean is the global row
    np.testing.assert_allclose(new["conv.weight"][:2], glob["conv.weight"][:2], rtol=1e-6)
