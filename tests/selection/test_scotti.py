"""SCoTTi's update rule against a float64 PyTorch implementation written here from the authors' description:
the hyper-parameters are tensors, each update is a graph through which autograd differentiates the next
loss (the straight-through freeze included), as in their optimizer (optim/optimSCoTTi.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call

from onnx_neq.backends.base import PORTABLE, SPECIALIZED, open_backend
from onnx_neq.selection.scotti import Scotti, ScottiSettings

SETTINGS = ScottiSettings(lr=0.05, momentum=0.9, eps=0.05, hyper_lr=1e-3, eps_hyper_lr=0.2, weight_decay=1e-3)
STEPS = 10


class _Ste(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return (x >= 0).double()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _torch_scotti(model, layers, velocity, batches, s: ScottiSettings):
    """STEPS steps; returns (lr, momentum, eps) after each and the final parameters."""
    model = copy.deepcopy(model).double().train()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    for p in params.values():
        p.requires_grad_()
    hyper = {
        k: torch.tensor(float(v), dtype=torch.float64, requires_grad=True)
        for k, v in (("lr", s.lr), ("momentum", s.momentum), ("eps", s.eps))
    }
    kappa = {"lr": s.hyper_lr, "momentum": s.hyper_lr, "eps": s.eps_hyper_lr}
    h = dict.fromkeys(hyper, 0.0)
    buffers: dict[str, torch.Tensor] = {}
    trace = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(functional_call(model, params, (torch.from_numpy(x).double(),)), torch.from_numpy(y))
        names = list(params)
        grads = torch.autograd.grad(loss, [params[n] for n in names] + list(hyper.values()), allow_unused=True)
        g_params = dict(zip(names, grads[: len(names)]))
        new_hyper = {}
        for (key, value), g in zip(hyper.items(), grads[len(names) :]):
            h[key] = 0.9 * h[key] + (0.0 if g is None else g.item())
            new_hyper[key] = torch.tensor(value.item() - kappa[key] * h[key], dtype=torch.float64, requires_grad=True)
        hyper = new_hyper
        masks = {layer: _Ste.apply(torch.from_numpy(v) - hyper["eps"]) for layer, v in velocity.items()}
        new_params = {}
        for name in names:
            p = params[name].detach()
            g = g_params[name].detach() + s.weight_decay * p
            layer = layers.get(name)
            keep = None if layer is None else masks[layer].detach().reshape((-1,) + (1,) * (p.dim() - 1))
            if keep is not None:
                g = g * keep
            b = hyper["momentum"] * buffers[name] + g if name in buffers else g
            if keep is not None:
                b = b * keep  # the authors zero the frozen rows of the buffer in place: no gradient reaches mu there
            buffers[name] = b.detach()
            if name.endswith("weight") and layer is not None:
                b = b * masks[layer].reshape((-1,) + (1,) * (p.dim() - 1))  # the straight-through freeze
            new_params[name] = p - hyper["lr"] * b
        params = new_params
        trace.append(tuple(v.item() for v in hyper.values()))
    return trace, {k: v.detach().numpy() for k, v in params.items()}


def _velocity(manifest, rng) -> dict[str, np.ndarray]:
    """Around eps0, so that about half the channels freeze and the moving threshold crosses some."""
    return {layer.name: rng.uniform(0.0, 0.1, layer.out_channels) for layer in manifest.layers}


def _run_ours(backend_name, artifacts, velocity, batches):
    backend = open_backend(backend_name, artifacts)
    rule = Scotti(SETTINGS)
    backend.set_update_rule(rule)
    rule.set_velocity(velocity)
    backend.set_masks({name: np.ones(len(v), np.float32) for name, v in velocity.items()})  # the first step: every gradient
    before = backend.parameters()
    trace = []
    for x, y in batches:
        backend.train_step(x, y, 0.0)
        backend.set_masks({k: m.astype(np.float32) for k, m in rule.masks.items()})  # what the policy does after each step
        trace.append(tuple(rule.values[k] for k in ("lr", "momentum", "eps")))
    return trace, before, backend.parameters(), backend


def _batches(kind: str, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    """ "same": one batch again and again (successive gradients agree: the rate rises, the threshold falls and
    unfreezes channels); "random": fresh batches and labels (they disagree: the threshold rises)."""
    fresh = [(rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 8)) for _ in range(STEPS)]
    return fresh[:1] * STEPS if kind == "same" else fresh


@pytest.mark.parametrize("backend_name", [PORTABLE, SPECIALIZED])
@pytest.mark.parametrize("kind", ["same", "random"])
def test_ten_steps_match_float64_torch(backend_name, kind, tiny_onnx, tiny_artifacts, rng):
    from onnx_neq.manifest import read_manifest

    manifest = read_manifest(tiny_artifacts)
    velocity = _velocity(manifest, rng)
    batches = _batches(kind, rng)
    layers = {p: layer.name for layer in manifest.layers for p in (layer.weight, layer.bias) if p}
    ref_trace, ref_params = _torch_scotti(tiny_onnx[1], layers, velocity, batches, SETTINGS)
    trace, before, after, backend = _run_ours(backend_name, tiny_artifacts, velocity, batches)
    for ours, ref in zip(trace, ref_trace):
        for value, expected, start in zip(ours, ref, (SETTINGS.lr, SETTINGS.momentum, SETTINGS.eps)):
            assert value - start == pytest.approx(expected - start, rel=2e-3, abs=1e-9)
    moved = ref_trace[-1][2] - SETTINGS.eps  # the threshold must move, each way once, for the test to mean anything
    assert moved < -0.02 if kind == "same" else moved > 1e-3
    assert abs(ref_trace[-1][0] - SETTINGS.lr) > 1e-4 and abs(ref_trace[-1][1] - SETTINGS.momentum) > 1e-6
    for name, ref in ref_params.items():
        update, ref_update = after[name] - before[name], ref - before[name]
        assert np.linalg.norm(update - ref_update) <= 1e-3 * np.linalg.norm(ref_update) + 1e-7, name
    if backend_name == SPECIALIZED and kind == "same":
        assert backend.recomputed > 0, "the threshold fell below some velocity: those steps were computed again"


def test_frozen_rows_never_written(tiny_artifacts, rng):
    """Momentum and weight decay move nothing that the threshold froze: the frozen rows stay bit-identical."""
    from onnx_neq.manifest import read_manifest

    manifest = read_manifest(tiny_artifacts)
    velocity = _velocity(manifest, rng)
    settings = ScottiSettings(lr=0.05, momentum=0.9, eps=0.05, hyper_lr=0.0, eps_hyper_lr=0.0, weight_decay=1e-2)
    backend = open_backend(PORTABLE, tiny_artifacts)
    rule = Scotti(settings)
    backend.set_update_rule(rule)
    before = backend.parameters()
    for _ in range(3):  # warm-up steps: momentum builds in every row
        backend.train_step(rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 8), 0.0)
    rule.set_velocity(velocity)
    mid = backend.parameters()
    for _ in range(4):
        backend.train_step(rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 8), 0.0)
    after = backend.parameters()
    frozen_some = 0
    for layer in manifest.layers:
        frozen = np.abs(velocity[layer.name]) < settings.eps
        frozen_some += frozen.sum()
        for p in filter(None, (layer.weight, layer.bias)):
            assert np.array_equal(after[p][frozen], mid[p][frozen]), p
            assert not np.array_equal(after[p][~frozen], mid[p][~frozen]), p
    assert frozen_some > 0
    assert not np.array_equal(mid[manifest.layers[0].weight], before[manifest.layers[0].weight])


def test_state_round_trip_continues_identically(tiny_artifacts, rng):
    """The rule's state (scalars, their momenta, both buffers) is what a resume needs: a fresh rule loaded from it steps identically."""
    from onnx_neq.manifest import read_manifest

    manifest = read_manifest(tiny_artifacts)
    velocity = _velocity(manifest, rng)
    batches = [(rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 8)) for _ in range(4)]
    a, b = open_backend(PORTABLE, tiny_artifacts), open_backend(PORTABLE, tiny_artifacts)
    rule_a = Scotti(SETTINGS)
    a.set_update_rule(rule_a)
    rule_a.set_velocity(velocity)
    for x, y in batches[:2]:
        a.train_step(x, y, 0.0)
    for name, value in a.parameters().items():
        np.copyto(b.params[name], value)
    rule_b = Scotti(SETTINGS)
    b.set_update_rule(rule_b)
    rule_b.load_state_dict({k: np.array(v) for k, v in rule_a.state_dict().items()})
    rule_b.set_velocity(velocity)
    rule_b.masks = {k: v.copy() for k, v in rule_a.masks.items()}
    for x, y in batches[2:]:
        a.train_step(x, y, 0.0)
        b.train_step(x, y, 0.0)
    assert rule_a.values == rule_b.values
    for name, value in a.parameters().items():
        assert np.array_equal(value, b.params[name]), name
