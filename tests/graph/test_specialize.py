"""Specialised training graphs (backends/specialize.py) against the full masked graph.

The reference is the artifacts' portable_training_model.onnx (every gradient, masked per channel) run
with the same parameters, batch and masks: the specialised graph's gradients of the selected channels
must equal the masked graph's, and an SGD step built from them must leave every other parameter
element bit-identical.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from onnx_neq.graph.specialize import channel_inputs, layer_states, specialize
from onnx_neq.manifest import read_manifest
from onnx_neq.ort_runtime import inference_session

LR = 0.05


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """The shipped MobileNetV2 0.35 (frozen BatchNorm) with a 10-class head."""
    from onnx_neq.graph.prepare import prepare
    from onnx_neq.training.default_model import SHIPPED

    out = tmp_path_factory.mktemp("mobilenet") / "art"
    prepare(SHIPPED, out, num_classes=10)
    return out


class Art:
    """An artifacts directory, its parameters, and sessions cached per directory."""

    _cache: dict = {}

    def __new__(cls, directory):
        key = str(directory)
        if key not in cls._cache:
            self = super().__new__(cls)
            self.dir = directory
            self.manifest = read_manifest(directory)
            self.training = onnx.load(str(directory / self.manifest.files["training_model"]))
            with np.load(directory / self.manifest.files["parameters"]) as z:
                self.params = {k: z[k] for k in z.files}
            self.full = inference_session(str(directory / self.manifest.files["portable_training_model"]))
            self.convs = {n.name: n for n in self.training.graph.node if n.op_type == "Conv"}
            cls._cache[key] = self
        return cls._cache[key]

    def strided(self, layer) -> bool:
        attrs = {a.name: list(a.ints) for a in self.convs[layer.node].attribute}
        return any(s > 1 for s in attrs.get("strides", []))

    def batch(self, n, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, *self.manifest.input.shape[1:])).astype(np.float32)
        return x, rng.integers(0, self.manifest.num_classes, n).astype(np.int64)

    def run(self, session, x, y, extra):
        names = {i.name for i in session.get_inputs()}
        feeds = {self.manifest.input.name: x, self.manifest.label_input: y, **extra}
        feeds.update({k: v for k, v in self.params.items() if k in names})
        feeds = {k: v for k, v in feeds.items() if k in names}
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    def reference(self, x, y, masks):
        feeds = {layer.mask_input: np.asarray(masks[layer.name], np.float32) for layer in self.manifest.layers}
        return self.run(self.full, x, y, feeds)


def expected_bn(layer: str) -> str:
    """The BatchNorm after a conv, by torchvision's and the tiny model's naming (independent of the
    graph matching under test): features.3.conv.1.0 -> features.3.conv.1.1, layer1.0.conv2 -> layer1.0.bn2."""
    tiny = {"stem": "bn1", "dw": "bn2", "grouped": "bn3"}
    if layer in tiny:
        return tiny[layer]
    head, _, last = layer.rpartition(".")
    if last.isdigit():
        return f"{head}.{int(last) + 1}" if head else str(int(last) + 1)
    return re.sub(r"conv(\d+)$", r"bn\1", layer)


def make_masks(art, states, rng, k=None):
    masks = {}
    for layer in art.manifest.layers:
        c = layer.out_channels
        state = states[layer.name]
        if state == "none":
            masks[layer.name] = np.zeros(c, np.float32)
        elif state == "all":
            masks[layer.name] = np.ones(c, np.float32)
        else:
            n = k if k is not None else int(rng.integers(1, c))
            m = np.zeros(c, np.float32)
            m[rng.choice(c, min(n, c - 1), replace=False)] = 1
            masks[layer.name] = m
    return masks


def mixed_states(art):
    """Every state, on regular, depthwise and strided convs: some / none / all / some in turn, then the
    first strided regular conv and the first (strided) depthwise conv partially selected."""
    layers = art.manifest.layers
    states = {layer.name: ("some", "none", "all", "some")[i % 4] for i, layer in enumerate(layers)}
    for kind in ("conv", "depthwise"):
        strided = [l for l in layers if l.kind == kind and art.strided(l)]
        plain = [l for l in layers if l.kind == kind and not art.strided(l)]
        for group in (strided, plain):
            if group:
                states[group[0].name] = "some"
    kinds = {s: {l.kind for l in layers if states[l.name] == s} for s in ("some", "none", "all")}
    assert kinds["some"] >= {l.kind for l in layers} and kinds["none"] and kinds["all"], kinds
    return states


def update_masks(art, masks, bn_update):
    """param -> per-output-channel bool mask of the elements a step may change (None: all of them)."""
    out = {}
    for layer in art.manifest.layers:
        m = np.asarray(masks[layer.name]) != 0
        for p in (layer.weight, layer.bias):
            if p:
                out[p] = m
        if bn_update == "selected":
            bn = expected_bn(layer.name)
            for p in (f"{bn}.weight", f"{bn}.bias"):
                if p in art.manifest.always_trained:
                    out[p] = m
    return out


def check_against_masked(art, states, bn_update, masks, batch=6, seed=0):
    """Specialised gradients == masked full-graph gradients on the selected channels, and one SGD step."""
    before = art.training.SerializeToString()
    model, report = specialize(art.training, art.manifest, states, bn_update)
    assert art.training.SerializeToString() == before  # the cached training graph is not touched
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain == "" for n in model.graph.node)
    names = {i.name for i in model.graph.input}
    assert not any(layer.mask_input in names for layer in art.manifest.layers)
    x, y = art.batch(batch, seed)
    want = art.reference(x, y, masks)
    got = art.run(inference_session(model), x, y, channel_inputs(art.manifest, masks))
    np.testing.assert_allclose(got[art.manifest.loss_output], want[art.manifest.loss_output], rtol=1e-6)
    for s in art.manifest.bn_stats:  # the forward statistics stay outputs
        np.testing.assert_allclose(got[s["batch_mean"]], want[s["batch_mean"]], rtol=1e-6, atol=1e-7)
    selected = update_masks(art, masks, bn_update)
    grads = {name[: -len("_grad")]: g for name, g in got.items() if name.endswith("_grad")}
    assert [n for n, _ in report.gradient_outputs] == [f"{p}_grad" for p in grads]
    # which gradients exist: none -> none, some/all -> the layer's (BN's with "selected"), always-trained otherwise
    expected = set(art.manifest.always_trained)
    for layer in art.manifest.layers:
        params = {p for p in (layer.weight, layer.bias) if p}
        bn = {f"{expected_bn(layer.name)}.weight", f"{expected_bn(layer.name)}.bias"} & set(art.manifest.always_trained)
        assert sorted(report.layers[layer.name].bn_params) == sorted(bn), layer.name
        if states[layer.name] != "none":
            expected |= params
        elif bn_update == "selected":
            expected -= bn
    assert set(grads) == expected
    for param, g in grads.items():
        ref = want[f"{param}_grad"]
        m = selected.get(param)
        if m is not None and not m.all():
            idx = np.flatnonzero(m)
            assert g.shape == (len(idx), *ref.shape[1:]), param
            ref = ref[idx]
        else:
            assert g.shape == ref.shape, param
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * scale + 1e-9, err_msg=param)
    # SGD on the host: w[idx] -= lr * g; everything else bit-identical
    for param, w in art.params.items():
        new = w.copy()
        m = selected.get(param)
        if param in grads:
            if m is not None and not m.all():
                new[np.flatnonzero(m)] -= LR * grads[param]
            else:
                new -= LR * grads[param]
        if f"{param}_grad" not in want:  # frozen (running statistics)
            assert np.array_equal(new, w), param
            continue
        ref_new = w - LR * want[f"{param}_grad"]
        on = np.ones(w.shape[0], bool) if m is None else m
        if param not in grads:
            on = np.zeros(w.shape[0], bool)
        assert np.array_equal(new[~on], w[~on]), param
        np.testing.assert_allclose(new[on], ref_new[on], rtol=1e-5, atol=1e-7, err_msg=param)
    return model, report, got


def grad_size_expected(art, masks, bn_update) -> int:
    """Scalars of all gradient outputs, counted from the manifest: selected neurons times their cost,
    the classifier, other parameters, and BN (all of it, or 2 per selected channel)."""
    man = art.manifest
    assert man.bn_params == 2 * sum(l.out_channels for l in man.layers)  # one BN (scale, bias) per conv
    selected = {l.name: int(np.count_nonzero(masks[l.name])) for l in man.layers}
    total = sum(selected[l.name] * l.neuron_cost for l in man.layers) + man.classifier_params + man.other_params
    return total + (man.bn_params if bn_update == "always" else 2 * sum(selected.values()))


# -- tests -------------------------------------------------------------------------------------


def test_layer_states_and_channel_inputs(tiny_artifacts):
    art = Art(tiny_artifacts)
    masks = {"stem": np.zeros(8), "dw": np.array([0, 1, 0, 0, 1, 0, 0, 1.0]), "grouped": np.ones(12)}
    assert layer_states(art.manifest, masks) == {"stem": "none", "dw": "some", "grouped": "all"}
    feeds = channel_inputs(art.manifest, masks)
    assert list(feeds) == ["dw.neq_channels"] and feeds["dw.neq_channels"].tolist() == [1, 4, 7]
    assert feeds["dw.neq_channels"].dtype == np.int64


@pytest.mark.parametrize("bn_update", ["always", "selected"])
@pytest.mark.parametrize(
    "states",
    [
        {"stem": "some", "dw": "some", "grouped": "all"},
        {"stem": "none", "dw": "some", "grouped": "some"},
        {"stem": "all", "dw": "none", "grouped": "some"},
    ],
)
def test_tiny(tiny_artifacts, frozen_bn_artifacts, states, bn_update):
    rng = np.random.default_rng(1)
    for directory in (tiny_artifacts, frozen_bn_artifacts["sgd"]):
        art = Art(directory)
        masks = make_masks(art, states, rng)
        _, _, got = check_against_masked(art, states, bn_update, masks)
        assert sum(v.size for k, v in got.items() if k.endswith("_grad")) == grad_size_expected(art, masks, bn_update)


@pytest.mark.parametrize("bn_update", ["always", "selected"])
def test_shipped_mobilenet(mobilenet, bn_update):
    art = Art(mobilenet)
    assert not art.manifest.bn_stats  # frozen BatchNorm
    states = mixed_states(art)
    masks = make_masks(art, states, np.random.default_rng(2))
    _, _, got = check_against_masked(art, states, bn_update, masks, batch=4)
    assert sum(v.size for k, v in got.items() if k.endswith("_grad")) == grad_size_expected(art, masks, bn_update)


@pytest.mark.parametrize("bn_update", ["always", "selected"])
def test_resnet18_training_bn(resnet18_artifacts, bn_update):
    art = Art(resnet18_artifacts)
    assert art.manifest.bn_stats  # batch-statistics BatchNorm
    states = mixed_states(art)
    masks = make_masks(art, states, np.random.default_rng(3))
    _, _, got = check_against_masked(art, states, bn_update, masks, batch=4)
    assert sum(v.size for k, v in got.items() if k.endswith("_grad")) == grad_size_expected(art, masks, bn_update)


def test_any_k_with_one_graph(mobilenet):
    """k = 1, a few, and all but one channel through the same specialised model."""
    art = Art(mobilenet)
    states = mixed_states(art)
    model, _ = specialize(art.training, art.manifest, states, "selected")
    session = inference_session(model)
    x, y = art.batch(3)
    for k in (1, 3, None):
        rng = np.random.default_rng(k or 0)
        masks = make_masks(art, states, rng, k=k if k else 10**6)
        want = art.reference(x, y, masks)
        got = art.run(session, x, y, channel_inputs(art.manifest, masks))
        for layer in art.manifest.layers:
            if states[layer.name] == "some":
                idx = np.flatnonzero(masks[layer.name])
                assert len(idx) == (k or layer.out_channels - 1)
                g, ref = got[f"{layer.weight}_grad"], want[f"{layer.weight}_grad"][idx]
                np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max() + 1e-9, err_msg=layer.name)


def test_backward_is_cut(mobilenet):
    """Only the last conv trains (BN selected): no dX ConvTranspose at all, no dW of an earlier layer, and the
    selected rows of its weight gradient as the full masked graph computes them."""
    art = Art(mobilenet)
    layers = art.manifest.layers
    states = {l.name: "none" for l in layers}
    states[layers[-1].name] = "some"
    model, report = specialize(art.training, art.manifest, states, "selected")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ConvTranspose") == 0
    assert ops.count("Conv") == len(layers)  # the forward convs only (the last conv is 1x1: its dW is a MatMul)
    assert report.layers[layers[-1].name].dx_macs == 0
    assert all(spec.dx_macs == spec.dw_macs == spec.dw_macs_per_channel == 0 for spec in list(report.layers.values())[:-1])
    # the first conv's input reaches no node but the forward's (the first Conv) and nothing of the backward
    consumers = [n for n in model.graph.node if art.manifest.input.name in n.input]
    assert [n.op_type for n in consumers] == ["Conv"]
    grads = [name for name, _ in report.gradient_outputs]
    last = layers[-1]
    bn = expected_bn(last.name)
    head = [p for p in art.manifest.always_trained if p.startswith("classifier")]
    assert grads == [f"{last.weight}_grad", f"{bn}.weight_grad", f"{bn}.bias_grad"] + [f"{p}_grad" for p in head]

    # the cut graph still computes the last conv's selected rows (its step time: benchmarks/budget_step.py)
    masks = make_masks(art, states, np.random.default_rng(4))
    x, y = art.batch(4)
    got = art.run(inference_session(model), x, y, channel_inputs(art.manifest, masks))
    want = art.reference(x, y, masks)[f"{last.weight}_grad"][np.flatnonzero(masks[last.name])]
    np.testing.assert_allclose(got[f"{last.weight}_grad"], want, rtol=1e-5, atol=1e-6 * np.abs(want).max() + 1e-9)


def test_backward_macs_shrink(mobilenet):
    art = Art(mobilenet)
    layers = [l.name for l in art.manifest.layers]
    macs = []
    for first in (0, len(layers) // 2, len(layers) - len(layers) // 10, len(layers) - 1):
        states = {name: ("all" if i >= first else "none") for i, name in enumerate(layers)}
        _, report = specialize(art.training, art.manifest, states, "selected")
        macs.append(report.backward_macs())
    assert all(a > b for a, b in zip(macs, macs[1:])), macs
    # with "some": fewer channels, fewer MACs
    states = {name: ("some" if i >= len(layers) // 2 else "none") for i, name in enumerate(layers)}
    _, report = specialize(art.training, art.manifest, states, "selected")
    half = {l.name: l.out_channels // 2 for l in art.manifest.layers}
    one = {l.name: 1 for l in art.manifest.layers}
    assert report.backward_macs(one) < report.backward_macs(half) < report.backward_macs() == macs[1]
    print(f"\nbackward MACs per image {macs}")  # build times: benchmarks/budget_step.py measures them


def test_refusals(tiny_artifacts):
    from onnx_neq.errors import NeqError

    art = Art(tiny_artifacts)
    with pytest.raises(NeqError, match="no state"):
        specialize(art.training, art.manifest, {"stem": "all"})
    with pytest.raises(NeqError, match="must be one of"):
        specialize(art.training, art.manifest, {"stem": "all", "dw": "half", "grouped": "all"})
    with pytest.raises(NeqError, match="bn_update"):
        specialize(art.training, art.manifest, {"stem": "all", "dw": "all", "grouped": "all"}, "never")


# -- the ConvGrad lowering with selected channels, against ORT's ConvGrad kernel ----------------

CHANNEL_CASES = {
    "3x3_stride2_asym": dict(c_in=4, c_out=6, k=(3, 3), strides=(2, 2), pads=(0, 1, 2, 0), dil=(1, 1), group=1),
    "1x1": dict(c_in=5, c_out=7, k=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), group=1),
    "1x1_stride2": dict(c_in=5, c_out=7, k=(1, 1), strides=(2, 2), pads=(0, 0, 0, 0), dil=(1, 1), group=1),
    "dilation2": dict(c_in=3, c_out=4, k=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dil=(2, 2), group=1),
    "depthwise_stride2": dict(c_in=6, c_out=6, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), group=6),
    "depthwise_x2_dil": dict(c_in=4, c_out=8, k=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dil=(2, 2), group=4),
    "depthwise_nonsquare": dict(c_in=5, c_out=5, k=(1, 5), strides=(1, 2), pads=(0, 2, 0, 1), dil=(1, 1), group=5),
    "grouped": dict(c_in=8, c_out=12, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), group=4),
}


@pytest.mark.parametrize("case", sorted(CHANNEL_CASES))
def test_conv_grad_channels(case):
    from onnx import TensorProto, helper

    from onnx_neq.graph.lowering.builder import Builder
    from onnx_neq.graph.lowering.conv_grad import lower_conv_grad

    c = CHANNEL_CASES[case]
    spatial, r = (9, 10), len(c["k"])
    out = [(spatial[i] + c["pads"][i] + c["pads"][i + r] - (c["k"][i] - 1) * c["dil"][i] - 1) // c["strides"][i] + 1 for i in range(r)]
    attrs = dict(kernel_shape=list(c["k"]), strides=list(c["strides"]), pads=list(c["pads"]), dilations=list(c["dil"]), group=c["group"])
    w_shape = [c["c_out"], c["c_in"] // c["group"], *c["k"]]
    vi = helper.make_tensor_value_info
    io = [vi("dY", 1, ["N", c["c_out"], *out]), vi("X", 1, ["N", c["c_in"], *spatial]), vi("W", 1, w_shape)]
    node = helper.make_node("ConvGrad", ["dY", "X", "W"], ["", "dW", "dB"], name="cg", domain="com.microsoft", **attrs)
    outputs = [vi("dW", 1, ["k", *w_shape[1:]]), vi("dB", 1, ["k"])]
    ort_model = helper.make_model(
        helper.make_graph([node], "g", io, outputs),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )
    shapes = {v.name: (1, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in io}
    used: set[str] = set()

    def fresh(hint):
        name = hint
        while name in used:
            name += "_"
        used.add(name)
        return name

    b = Builder(node, shapes, {}, fresh)
    lower_conv_grad(b, channels="ch")
    assert not any(n.op_type == "ConvTranspose" for n in b.nodes)  # no dX asked for
    lowered = helper.make_model(
        helper.make_graph(b.nodes, "g", io + [vi("ch", TensorProto.INT64, ["k"])], outputs, b.initializers),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    onnx.checker.check_model(lowered)
    rng = np.random.default_rng(0)
    feeds = {
        "dY": rng.standard_normal((3, c["c_out"], *out)).astype(np.float32),
        "X": rng.standard_normal((3, c["c_in"], *spatial)).astype(np.float32),
        "W": rng.standard_normal(w_shape).astype(np.float32),
    }
    want_w, want_b = inference_session(ort_model).run(None, feeds)
    session = inference_session(lowered)
    for k in (1, 3, c["c_out"]):
        ch = np.sort(rng.choice(c["c_out"], k, replace=False)).astype(np.int64)
        got_w, got_b = session.run(None, {**feeds, "ch": ch})
        np.testing.assert_allclose(got_w, want_w[ch], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_b, want_b[ch], rtol=1e-5, atol=1e-5)
