"""Host optimizers against ORT's own kernels: the training session's optimizer step, and the
SGDOptimizerV2 / AdamWOptimizer nodes run directly (with their optional outputs) on chosen inputs."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_neq.backends.host_optim import (
    HostAdamW,
    HostSGD,
    make_optimizer,
    numpy_sqrt,
    optimizer_for_manifest,
    optimizer_from_model,
)
from onnx_neq.errors import NeqError

LRS = (0.05, 0.013, 0.2)


class _GradTap:
    """Stands in for TrainingSession.optimizer: records the gradients ORT feeds each step."""

    def __init__(self, session):
        self.session, self.inner, self.grads = session, session.optimizer, []

    def set_learning_rate(self, lr: float) -> None:
        self.inner.set_learning_rate(lr)

    def step(self) -> None:
        params = self.session.state.parameters
        self.grads.append({n: params[n].grad.copy() for n in _trainable(self.session)})
        self.inner.step()


def _trainable(session) -> list[str]:
    return [name for name, p in session.state.parameters if p.requires_grad]


def _param_masks(session, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {p: masks[layer.name] for layer in session.manifest.layers for p in (layer.weight, layer.bias) if p}


def _run_both(art_dir, host, masks=None):
    """train_step on the ORT backend and host.step on copies; yields both parameter sets per step."""
    from onnx_neq.backends.ort_training import TrainingSession

    session = TrainingSession(art_dir)
    if masks:
        session.set_masks(masks)
    tap = session.optimizer = _GradTap(session)
    params = {n: session.parameter(n).copy() for n in _trainable(session)}
    buffers = {n: p.ctypes.data for n, p in params.items()}
    rng = np.random.default_rng(3)
    for lr in LRS:
        images = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
        session.train_step(images, rng.integers(0, 5, 4), lr)
        host.step(params, tap.grads[-1], lr, _param_masks(session, session.masks) if masks else None)
        assert {n: p.ctypes.data for n, p in params.items()} == buffers  # updated in place
        yield {n: session.parameter(n) for n in params}, params


def _max_rel(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[n] - b[n]) / (np.abs(a[n]) + 1e-12))) for n in a)


# --- against the training session ------------------------------------------------------------
def test_sgd_matches_ort_exactly(frozen_bn_artifacts):
    host = optimizer_for_manifest(_manifest(frozen_bn_artifacts["sgd"]))
    assert isinstance(host, HostSGD)
    for ort_params, host_params in _run_both(frozen_bn_artifacts["sgd"], host):
        for name in ort_params:
            np.testing.assert_array_equal(host_params[name], ort_params[name], err_msg=name)


def test_adamw_matches_ort_exactly(frozen_bn_artifacts):
    host = optimizer_for_manifest(_manifest(frozen_bn_artifacts["adamw"]))
    assert isinstance(host, HostAdamW) and host.weight_decay == np.float32(0.1)
    for ort_params, host_params in _run_both(frozen_bn_artifacts["adamw"], host):
        for name in ort_params:
            np.testing.assert_array_equal(host_params[name], ort_params[name], err_msg=name)
    assert host.step_count == len(LRS)


def test_adamw_numpy_sqrt_within_1e6(frozen_bn_artifacts):
    host = make_optimizer("adamw", 0.1, sqrt="numpy")
    for ort_params, host_params in _run_both(frozen_bn_artifacts["adamw"], host):
        for name in ort_params:  # a few ulp of each update (~lr): 1e-6 of the tensor's scale
            scale = float(np.abs(ort_params[name]).max())
            np.testing.assert_allclose(host_params[name], ort_params[name], rtol=1e-6, atol=1e-6 * scale, err_msg=name)
        print("max pointwise relative difference", _max_rel(host_params, ort_params))


def test_adamw_masks_match_ort_backend(frozen_bn_artifacts):
    """Half the channels of every layer frozen: the ORT backend (masked gradients, restored
    weights) and the host step agree bit for bit, and frozen rows never change."""
    from onnx_neq.backends.ort_training import TrainingSession

    layers = TrainingSession(frozen_bn_artifacts["adamw"]).manifest.layers
    masks = {layer.name: (np.arange(layer.out_channels) % 2).astype(np.float32) for layer in layers}
    host = make_optimizer("adamw", 0.1)
    start = None
    for ort_params, host_params in _run_both(frozen_bn_artifacts["adamw"], host, masks):
        start = start or {n: p.copy() for n, p in ort_params.items()}  # after step 1; frozen rows are original
        for name in ort_params:
            np.testing.assert_array_equal(host_params[name], ort_params[name], err_msg=name)
    weight = layers[0].weight
    assert np.array_equal(host_params[weight][0::2], start[weight][0::2])
    assert not np.array_equal(host_params[weight][1::2], start[weight][1::2])


def test_constants_from_optimizer_model(frozen_bn_artifacts):
    from_model = optimizer_from_model(frozen_bn_artifacts["adamw"] / "optimizer_model.onnx")
    from_manifest = optimizer_for_manifest(_manifest(frozen_bn_artifacts["adamw"]))
    for attr in ("alpha", "beta", "eps", "weight_decay", "correct_bias", "adam_mode"):
        assert getattr(from_model, attr) == getattr(from_manifest, attr), attr
    assert (from_model.alpha, from_model.beta, from_model.eps) == (np.float32(0.9), np.float32(0.999), np.float32(1e-6))
    assert from_model.adam_mode == 1 and from_model.correct_bias
    assert isinstance(optimizer_from_model(frozen_bn_artifacts["sgd"] / "optimizer_model.onnx"), HostSGD)


def _manifest(art_dir):
    from onnx_neq.manifest import read_manifest

    return read_manifest(art_dir)


# --- against the kernels run directly -------------------------------------------------------
SHAPES = [(1,), (3,), (5, 1), (13,), (6, 2, 3, 3), (12, 2, 1, 1)]  # tails of every length mod 4 and 8


def _kernel_session(op: str, **attrs):
    from onnx import TensorProto, helper

    from onnx_neq.ort_runtime import onnxruntime

    seq = lambda n: helper.make_tensor_sequence_value_info(n, TensorProto.FLOAT, None)  # noqa: E731
    scalar = [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1])]
    if op == "AdamWOptimizer":
        scalar.append(helper.make_tensor_value_info("step", TensorProto.INT64, [1]))
    names = ["w", "g", "m", "v"] if op == "AdamWOptimizer" else ["w", "g"]
    outs = ["flag"] + [n + "2" for n in names if n != "g"]
    node = helper.make_node(op, [s.name for s in scalar] + names, outs, domain="com.microsoft", **attrs)
    out_info = [helper.make_tensor_value_info("flag", TensorProto.BOOL, None)] + [seq(n) for n in outs[1:]]
    graph = helper.make_graph([node], "k", scalar + [seq(n) for n in names], out_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    ort = onnxruntime()
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _adamw_kernel(session, lr, step, w, g, m, v):
    """One AdamWOptimizer run; the kernel writes into its numpy feeds, so it gets copies."""
    feeds = {"lr": np.array([lr], np.float32), "step": np.array([step], np.int64)}
    feeds.update({k: [a.copy() for a in x] for k, x in zip("wgmv", (w, g, m, v))})
    _, w2, m2, v2 = session.run(None, feeds)
    return w2, m2, v2


def _random_state(rng, scale=1.0):
    w = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    m = [(rng.standard_normal(s) * 1e-2 * scale).astype(np.float32) for s in SHAPES]
    v = [(rng.random(s) * 1e-4 * scale).astype(np.float32) for s in SHAPES]
    return w, m, v


@pytest.mark.parametrize("adam_mode,correct_bias,step", [(1, 1, 1), (1, 1, 7), (0, 1, 3), (1, 0, 2), (1, 1, 10**6)])
def test_adamw_kernel_exact(rng, adam_mode, correct_bias, step):
    """Nonzero moments, odd sizes, both modes, with and without bias correction, any step."""
    kernel = _kernel_session(
        "AdamWOptimizer", alpha=0.9, beta=0.999, epsilon=1e-6, weight_decay=0.05, correct_bias=correct_bias, adam_mode=adam_mode
    )
    w, m, v = _random_state(rng)
    host = HostAdamW(0.05, correct_bias=bool(correct_bias), adam_mode=adam_mode)
    names = [f"p{i}" for i in range(len(SHAPES))]
    host.load_state_dict({"step": np.array(step - 1), **_moments(names, m, v)})
    params = dict(zip(names, [a.copy() for a in w]))
    for lr in (0.03, 0.001):
        g = [(rng.standard_normal(s) * 1e-2).astype(np.float32) for s in SHAPES]
        w, m, v = _adamw_kernel(kernel, lr, host.step_count + 1, list(params.values()), g, m, v)
        host.step(params, dict(zip(names, g)), lr)
        for i, name in enumerate(names):
            np.testing.assert_array_equal(host.m[name], m[i])
            np.testing.assert_array_equal(host.v[name], v[i])
            np.testing.assert_array_equal(params[name], w[i])


def _moments(names, m, v) -> dict[str, np.ndarray]:
    return {**{f"momentum0/{n}": a for n, a in zip(names, m)}, **{f"momentum1/{n}": a for n, a in zip(names, v)}}


def test_adamw_numpy_sqrt_kernel_close(rng):
    kernel = _kernel_session("AdamWOptimizer", alpha=0.9, beta=0.999, epsilon=1e-6, weight_decay=0.1, correct_bias=1, adam_mode=1)
    w, m, v = _random_state(rng)
    g = [(rng.standard_normal(s) * 1e-2).astype(np.float32) for s in SHAPES]
    w2, _, _ = _adamw_kernel(kernel, 0.1, 1, w, g, [np.zeros_like(a) for a in m], [np.zeros_like(a) for a in v])
    params = {f"p{i}": a.copy() for i, a in enumerate(w)}
    HostAdamW(0.1, sqrt=numpy_sqrt).step(params, {f"p{i}": a for i, a in enumerate(g)}, 0.1)
    for i, p in enumerate(params.values()):
        np.testing.assert_allclose(p, w2[i], rtol=1e-6, atol=0)


def test_sgd_kernel_exact(rng):
    kernel = _kernel_session("SGDOptimizerV2")
    w = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    g = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    _, w2 = kernel.run(None, {"lr": np.array([0.037], np.float32), "w": [a.copy() for a in w], "g": [a.copy() for a in g]})
    params = {f"p{i}": a.copy() for i, a in enumerate(w)}
    HostSGD().step(params, {f"p{i}": a for i, a in enumerate(g)}, 0.037)
    for i, p in enumerate(params.values()):
        np.testing.assert_array_equal(p, w2[i])


# --- masks -----------------------------------------------------------------------------------
def test_adamw_masked_rows_frozen_bit_identical(rng):
    """Weight decay and nonzero moments would move every row; frozen rows stay bit-identical, their
    moments decay with a zero gradient, and the trained rows match the kernel with masked gradients."""
    kernel = _kernel_session("AdamWOptimizer", alpha=0.9, beta=0.999, epsilon=1e-6, weight_decay=0.1, correct_bias=1, adam_mode=1)
    w, m, v = _random_state(rng, scale=10.0)
    names = [f"p{i}" for i in range(len(SHAPES))]
    masks = {n: (rng.random(a.shape[0]) < 0.5).astype(np.float32) for n, a in zip(names, w)}
    masks["p2"][:] = [1, 0, 1, 0, 0]
    host = HostAdamW(0.1)
    host.load_state_dict({"step": np.array(4), **_moments(names, m, v)})
    params = dict(zip(names, [a.copy() for a in w]))
    original = {n: a.copy() for n, a in params.items()}
    for lr in (0.1, 0.05, 0.2):
        g = [(rng.standard_normal(s) * 1e-2).astype(np.float32) for s in SHAPES]
        masked_g = [a * _rows(masks[n], a) for n, a in zip(names, g)]
        w_ort, m, v = _adamw_kernel(kernel, lr, host.step_count + 1, list(params.values()), masked_g, m, v)
        host.step(params, dict(zip(names, g)), lr, masks)
        for i, name in enumerate(names):
            keep = _rows(masks[name], params[name]).astype(bool)
            frozen = ~np.broadcast_to(keep, params[name].shape)
            np.testing.assert_array_equal(params[name][frozen].view(np.int32), original[name][frozen].view(np.int32))
            np.testing.assert_array_equal(params[name][~frozen], w_ort[i][~frozen])
            np.testing.assert_array_equal(host.m[name], m[i])
            np.testing.assert_array_equal(host.v[name], v[i])
    trained = np.broadcast_to(_rows(masks["p4"], params["p4"]).astype(bool), params["p4"].shape)
    assert np.all(params["p4"][trained] != original["p4"][trained])


def test_sgd_masked_rows_frozen_bit_identical(rng):
    params = {"w": rng.standard_normal((6, 2, 3, 3)).astype(np.float32), "b": np.array([-0.0, 0.0, 1.0], np.float32)}
    grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()}
    masks = {"w": np.array([1, 0, 0, 1, 0, 1], np.float32), "b": np.array([0, 0, 1], np.float32)}
    before = {n: p.copy() for n, p in params.items()}
    HostSGD().step(params, grads, 0.1, masks)
    assert np.array_equal(params["w"][[1, 2, 4]], before["w"][[1, 2, 4]])
    assert np.all(params["w"][[0, 3, 5]] != before["w"][[0, 3, 5]])
    assert params["b"][:2].tobytes() == before["b"][:2].tobytes()  # signed zeros too


def _rows(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


# --- checkpointing ---------------------------------------------------------------------------
@pytest.mark.parametrize("sqrt", ["ort", "numpy"])
def test_state_dict_round_trip(rng, sqrt):
    shapes = {"a": (4, 3, 3, 3), "b": (4,), "c": (7,)}
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(3)]
    masks = {"a": np.array([1, 0, 1, 1], np.float32)}
    start = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    straight, params = make_optimizer("adamw", 0.01, sqrt), {n: a.copy() for n, a in start.items()}
    for i, lr in enumerate((0.1, 0.02, 0.05)):
        straight.step(params, grads[i], lr, masks)
    first, resumed = make_optimizer("adamw", 0.01, sqrt), {n: a.copy() for n, a in start.items()}
    first.step(resumed, grads[0], 0.1, masks)
    first.step(resumed, grads[1], 0.02, masks)
    state = first.state_dict()
    first.step({n: a.copy() for n, a in resumed.items()}, grads[2], 0.5)  # must not leak into the saved state
    second = make_optimizer("adamw", 0.01, sqrt)
    second.load_state_dict(state)
    assert second.step_count == 2
    second.step(resumed, grads[2], 0.05, masks)
    for name in shapes:
        assert resumed[name].tobytes() == params[name].tobytes()
        assert second.m[name].tobytes() == straight.m[name].tobytes()
        assert second.v[name].tobytes() == straight.v[name].tobytes()


def test_sgd_state_dict_and_factory_errors():
    sgd = make_optimizer("sgd", 0.0)
    assert set(sgd.state_dict()) == {"step"}
    with pytest.raises(NeqError, match="weight decay"):
        make_optimizer("sgd", 0.01)
    with pytest.raises(NeqError, match="sgd' or 'adamw"):
        make_optimizer("lamb", 0.0)
    with pytest.raises(NeqError, match="correct_bias"):
        HostAdamW(adam_mode=0, correct_bias=False)
    with pytest.raises(NeqError, match="mask has 2 entries"):
        HostSGD().step({"w": np.zeros((3, 1), np.float32)}, {"w": np.zeros((3, 1), np.float32)}, 0.1, {"w": np.ones(2)})
