"""GradientProbe against float64 PyTorch autograd on the model the artifacts were prepared from."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from conftest import make_tiny

from onnx_neq.errors import NeqError
from onnx_neq.manifest import read_manifest
from onnx_neq.training.gradient_stats import ChannelStats, GradientProbe, accumulate

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _stored_parameters(artifacts) -> dict[str, np.ndarray]:
    with np.load(artifacts / read_manifest(artifacts).files["parameters"]) as z:
        return {k: z[k] for k in z.files}


def _perturbed(params: dict[str, np.ndarray], rng) -> dict[str, np.ndarray]:
    """Weights and biases moved off the stored ones, so that the probe must use what it is given."""
    out = dict(params)
    for name, value in params.items():
        if name.endswith((".weight", ".bias")):
            out[name] = (value + 0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
    return out


def _torch_model(params: dict[str, np.ndarray], frozen_bn: bool):
    """The tiny CNN in float64 with the given parameters, matched to its state_dict by name and shape."""
    model = make_tiny().double().train()
    state = model.state_dict()
    loaded = {}
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        assert params[name].shape == tuple(value.shape), name
        loaded[name] = torch.from_numpy(params[name].astype(np.float64))
    model.load_state_dict(loaded, strict=False)
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    return model


def _reference(model, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grad_norm, grad_norm without biases, fisher) over the channels of stem, dw, grouped, by autograd."""
    convs = [model.stem, model.dw, model.grouped]
    outputs = []

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append(output)

    hooks = [c.register_forward_hook(keep) for c in convs]
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    F.cross_entropy(model(xt), yt).backward()  # batch-mean loss: the parameter gradients
    weight_sq = [c.weight.grad.reshape(c.out_channels, -1).pow(2).sum(1) for c in convs]
    bias_sq = [c.bias.grad.pow(2) if c.bias is not None else torch.zeros(c.out_channels, dtype=torch.float64) for c in convs]
    model.zero_grad()
    outputs.clear()
    F.cross_entropy(model(xt), yt, reduction="sum").backward()  # per-sample losses summed: g = d(sum l_n)/da
    n = len(x)
    fisher = [((a * a.grad).sum(dim=(2, 3)) ** 2).sum(0) / (2 * n) for a in outputs]
    for h in hooks:
        h.remove()
    norm = torch.cat([(w + b).sqrt() for w, b in zip(weight_sq, bias_sq)]).numpy()
    norm_no_bias = torch.cat([w.sqrt() for w in weight_sq]).numpy()
    return norm, norm_no_bias, torch.cat(fisher).detach().numpy()


@pytest.mark.parametrize("which", ["batch_bn", "frozen_bn"])
def test_matches_torch_autograd(which, request, rng):
    artifacts = request.getfixturevalue("tiny_artifacts") if which == "batch_bn" else request.getfixturevalue("frozen_bn_artifacts")["sgd"]
    params = _perturbed(_stored_parameters(artifacts), rng)
    before = {k: v.copy() for k, v in params.items()}
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 5)
    stats = GradientProbe(artifacts, threads=1).measure(params, x, y)
    norm, norm_no_bias, fisher = _reference(_torch_model(params, which == "frozen_bn"), x, y)
    assert stats.batches == 1 and stats.grad_norm.dtype == np.float64 and len(stats.grad_norm) == 28
    np.testing.assert_allclose(stats.grad_norm, norm, rtol=1e-4)
    np.testing.assert_allclose(stats.fisher, fisher, rtol=1e-3, atol=1e-6 * fisher.max())
    assert (fisher > 0).mean() > 0.7  # most channels carry signal (a ReLU-dead channel has 0)
    if which == "frozen_bn":  # conv biases have real gradients here: leaving them out must show
        assert np.abs(norm_no_bias - norm).max() > 1e-2 * norm.max()
    for name, value in before.items():
        assert np.array_equal(params[name], value), f"{name} changed"


def test_fisher_scales_with_the_batch_mean_gradient(tiny_artifacts, rng):
    """The same batch twice (N doubles, per-sample gradients of the frozen copies stay): fisher is a
    per-sample mean, so it must not change, while a missing factor N would double or halve it."""
    artifacts = tiny_artifacts
    probe = GradientProbe(artifacts)
    params = _stored_parameters(artifacts)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 4)
    once, twice = probe.measure(params, x, y), probe.measure(params, np.concatenate([x, x]), np.concatenate([y, y]))
    np.testing.assert_allclose(twice.fisher, once.fisher, rtol=1e-3, atol=1e-6 * once.fisher.max())
    np.testing.assert_allclose(twice.grad_norm, once.grad_norm, rtol=1e-4)


def test_accumulate_over_batches(tiny_artifacts, rng):
    probe = GradientProbe(tiny_artifacts)
    params = _stored_parameters(tiny_artifacts)
    batches = [(rng.standard_normal((3, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 3)) for _ in range(3)]
    single = [probe.measure(params, x, y) for x, y in batches]
    total = probe.measure_batches(params, batches)
    assert total.batches == 3
    np.testing.assert_allclose(total.grad_norm, (single[0].grad_norm + single[1].grad_norm + single[2].grad_norm) / 3, rtol=1e-12)
    np.testing.assert_allclose(total.fisher, single[0].fisher + single[1].fisher + single[2].fisher, rtol=1e-12)
    # merging is by batch counts, in any grouping
    grouped = single[0].merged(accumulate(single[1:]))
    np.testing.assert_allclose(grouped.grad_norm, total.grad_norm, rtol=1e-12)
    a = ChannelStats(np.array([1.0, 4.0]), np.array([1.0, 0.0]), 3)
    b = ChannelStats(np.array([5.0, 0.0]), np.array([2.0, 1.0]), 1)
    merged = a.merged(b)
    assert merged.batches == 4 and merged.grad_norm.tolist() == [2.0, 3.0] and merged.fisher.tolist() == [3.0, 1.0]
    with pytest.raises(NeqError):
        accumulate([])


def _rewritten(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    path = dst / read_manifest(dst).files["portable_training_model"]
    model = onnx.load(str(path))
    edit(model.graph)
    onnx.save(model, str(path))


def _rename_value(graph, old: str, new: str) -> None:
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == old:
                    seq[i] = new


def test_finds_the_gradient_by_the_manifest_alone(tiny_artifacts, tmp_path, rng):
    """dY renamed and every node renamed: the probe finds dL/da by the manifest's contract (the value of the conv
    output's shape that every path from the labels to `<weight>_grad` passes through), with the same result; a
    weight gradient that the labels do not reach (a graph outside the contract) is a NeqError naming the layer."""

    def hide(graph):
        _rename_value(graph, "/stem/Conv_output_0_grad", "mystery")
        for i, node in enumerate(graph.node):
            node.name = f"node{i}"

    _rewritten(tiny_artifacts, tmp_path / "hidden", hide)
    params = _stored_parameters(tiny_artifacts)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 4)
    probe, reference = GradientProbe(tmp_path / "hidden"), GradientProbe(tiny_artifacts)
    assert probe.layers[0].activation_grad == "mystery"
    assert [lo.activation_grad for lo in probe.layers[1:]] == [lo.activation_grad for lo in reference.layers[1:]]
    got, want = probe.measure(params, x, y), reference.measure(params, x, y)
    np.testing.assert_array_equal(got.fisher, want.fisher)
    np.testing.assert_array_equal(got.grad_norm, want.grad_norm)

    def cut(graph):  # grouped.weight_grad (the conv has no bias) = a constant: no path from the labels
        node = next(n for n in graph.node if "grouped.weight_grad" in n.output)
        graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((12, 2, 1, 1), np.float32), "zero_grad"))
        node.input[:] = ["zero_grad"]

    _rewritten(tiny_artifacts, tmp_path / "cut", cut)
    with pytest.raises(NeqError, match="layer 'grouped'"):
        GradientProbe(tmp_path / "cut")


def test_user_errors(tiny_artifacts, rng):
    probe = GradientProbe(tiny_artifacts)
    params = _stored_parameters(tiny_artifacts)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    with pytest.raises(NeqError, match="'dw.weight' is missing"):
        probe.measure({k: v for k, v in params.items() if k != "dw.weight"}, x, np.array([0, 1]))
    with pytest.raises(NeqError, match="labels"):
        probe.measure(params, x, np.array([0, 7]))
    with pytest.raises(NeqError, match="images of shape"):
        probe.measure(params, x[:, :2], np.array([0, 1]))
