"""A fleet's data split: a partition, IID sizes by hand, Dirichlet's two limits, determinism, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_neq.data.shards import parse_split, split_clients
from onnx_neq.errors import NeqError

LABELS = np.repeat(np.arange(5), 200)  # 5 classes x 200 images


def _is_partition(parts: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_iid_sizes_differ_by_at_most_one():
    parts = split_clients(LABELS, 3, "iid", seed=0)
    assert _is_partition(parts, 1000)
    assert sorted(len(p) for p in parts) == [333, 333, 334]  # 1000 = 334 + 333 + 333


def test_dirichlet_is_a_partition_and_deterministic():
    a = split_clients(LABELS, 10, "dirichlet:0.5", seed=3)
    b = split_clients(LABELS, 10, "dirichlet:0.5", seed=3)
    c = split_clients(LABELS, 10, "dirichlet:0.5", seed=4)
    assert _is_partition(a, 1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_limits():
    """alpha -> infinity: every client holds each class's 200 / 4 = 50 images (within rounding); alpha -> 0: each
    class goes (almost) whole to one client."""
    even = split_clients(LABELS, 4, "dirichlet:1e6", seed=0)
    for part in even:
        assert np.all(np.abs(np.bincount(LABELS[part], minlength=5) - 50) <= 2)
    skewed = split_clients(LABELS, 4, "dirichlet:0.001", seed=0)
    for label in range(5):
        counts = [int(np.sum(LABELS[p] == label)) for p in skewed]
        assert max(counts) >= 198


@pytest.mark.parametrize("spec", ["dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x", "iid:2", "random"])
def test_bad_specs_are_refused_in_one_line(spec):
    with pytest.raises(NeqError, match="iid or dirichlet:ALPHA"):
        parse_split(spec)


def test_too_many_clients_is_refused():
    with pytest.raises(NeqError, match="fewer --clients"):
        split_clients(LABELS[:5], 6, "iid", seed=0)
