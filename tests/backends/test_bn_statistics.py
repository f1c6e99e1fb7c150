"""--bn train: running statistics follow the target data as in PyTorch's train mode (momentum 0.1)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from onnx_neq.backends.ort_training import TrainingSession

torch = pytest.importorskip("torch")


def test_one_step_updates_running_statistics_like_pytorch(tiny_onnx, tiny_artifacts, rng):
    """lr 0 keeps the weights, so the one forward pass in train mode is the same in both."""
    _, model = tiny_onnx
    reference = copy.deepcopy(model).train()
    session = TrainingSession(tiny_artifacts)
    assert len(session.manifest.bn_stats) == 3
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    session.train_step(x, np.array([0, 1, 2, 3, 4, 0]), 0.0)
    with torch.no_grad():
        reference(torch.from_numpy(x))
    for name in ("bn1", "bn2", "bn3"):
        bn = getattr(reference, name)
        np.testing.assert_allclose(session.parameter(f"{name}.running_mean"), bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(session.parameter(f"{name}.running_var"), bn.running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_frozen_bn_has_no_statistics_to_update(frozen_bn_artifacts):
    session = TrainingSession(frozen_bn_artifacts["sgd"])
    assert session.manifest.bn_stats == []
