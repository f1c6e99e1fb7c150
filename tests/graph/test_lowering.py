"""The portable training model: every ORT training op lowered to standard ONNX, checked against ORT's own kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from support import LIGHT_ZOO

from onnx_neq.errors import NeqError
from onnx_neq.graph.lowering import RULES, lower_training_model
from onnx_neq.ort_runtime import inference_session, training_api

F, I64 = TensorProto.FLOAT, TensorProto.INT64
MS = "com.microsoft"


def _model(nodes, inputs, outputs, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def _vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def _run(model, feeds):
    session = inference_session(model)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _check_portable(lowered):
    onnx.checker.check_model(lowered, full_check=True)
    assert all(n.domain == "" for n in lowered.graph.node)
    assert [(o.domain, o.version) for o in lowered.opset_import] == [("", 17)] and lowered.ir_version == 8


def _compare(model, feeds, rtol=1e-5, atol=1e-6, feeds_list=None):
    """Lower `model`, check it is portable, and compare every output with ORT's kernels on each feed dict."""
    lowered, report = lower_training_model(model)
    _check_portable(lowered)
    for f in feeds_list or [feeds]:
        want, got = _run(model, f), _run(lowered, f)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)
    return report


# -- ConvGrad ---------------------------------------------------------------------------------

CONV_CASES = {
    "3x3_bias": dict(c_in=4, c_out=6, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), group=1, bias=True),
    "no_bias": dict(c_in=4, c_out=6, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), group=1, bias=False),
    "stride2": dict(c_in=3, c_out=5, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), group=1, bias=True),
    "dilation2": dict(c_in=3, c_out=4, k=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dil=(2, 2), group=1, bias=True),
    "grouped": dict(c_in=8, c_out=12, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), group=4, bias=True),
    "depthwise": dict(c_in=6, c_out=6, k=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dil=(1, 1), group=6, bias=True),
    "1x1_stride2": dict(c_in=5, c_out=7, k=(1, 1), strides=(2, 2), pads=(0, 0, 0, 0), dil=(1, 1), group=1, bias=True),
    "1x1": dict(c_in=5, c_out=7, k=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), group=1, bias=False),
    "asym_pads": dict(c_in=3, c_out=4, k=(3, 3), strides=(2, 2), pads=(0, 1, 2, 0), dil=(1, 1), group=1, bias=True),
    "nonsquare": dict(c_in=3, c_out=4, k=(1, 5), strides=(1, 2), pads=(0, 2, 0, 1), dil=(1, 1), group=1, bias=True),
    # >= 16 input channels and >= 64 output positions: the im2col form of dW
    "im2col_3x3": dict(c_in=16, c_out=6, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), group=1, bias=True),
    "im2col_stride2_asym": dict(
        c_in=16, c_out=5, k=(3, 3), strides=(2, 2), pads=(0, 1, 2, 0), dil=(1, 1), group=1, bias=True, spatial=(17, 18)
    ),
    "im2col_dilation2": dict(c_in=17, c_out=4, k=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dil=(2, 2), group=1, bias=True),
    "im2col_nonsquare": dict(
        c_in=16, c_out=4, k=(1, 5), strides=(1, 2), pads=(0, 2, 0, 1), dil=(1, 1), group=1, bias=True, spatial=(12, 12)
    ),
}
SPATIAL = (9, 10)


def _out_size(i, k, s, d, pb, pe):
    return (i + pb + pe - (k - 1) * d - 1) // s + 1


def _conv_grad_model(case):
    r = len(case["k"])
    pads, k, s, d, spatial = case["pads"], case["k"], case["strides"], case["dil"], case.get("spatial", SPATIAL)
    out = [_out_size(spatial[i], k[i], s[i], d[i], pads[i], pads[i + r]) for i in range(r)]
    w_shape = [case["c_out"], case["c_in"] // case["group"], *k]
    outputs = ["dX", "dW", "dB"] if case["bias"] else ["dX", "dW"]
    node = helper.make_node(
        "ConvGrad", ["dY", "X", "W"], outputs, domain=MS, name="conv_grad",
        kernel_shape=list(k), strides=list(s), pads=list(pads), dilations=list(d), group=case["group"],
    )  # fmt: skip
    inputs = [_vi("dY", ["N", case["c_out"], *out]), _vi("X", ["N", case["c_in"], *spatial]), _vi("W", w_shape)]
    outs = [_vi("dX", ["N", case["c_in"], *spatial]), _vi("dW", w_shape)] + ([_vi("dB", [case["c_out"]])] if case["bias"] else [])
    return _model([node], inputs, outs), out, w_shape


def _conv_feeds(case, out, w_shape, batch, rng):
    return {
        "dY": rng.standard_normal((batch, case["c_out"], *out)).astype(np.float32),
        "X": rng.standard_normal((batch, case["c_in"], *case.get("spatial", SPATIAL))).astype(np.float32),
        "W": rng.standard_normal(w_shape).astype(np.float32),
    }


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_grad_matches_ort_for_batch_1_and_3(name, rng):
    case = CONV_CASES[name]
    model, out, w_shape = _conv_grad_model(case)
    feeds = [_conv_feeds(case, out, w_shape, batch, rng) for batch in (1, 3)]
    report = _compare(model, None, rtol=1e-4, atol=1e-4, feeds_list=feeds)
    assert report.lowered == {"ConvGrad": 1}


@pytest.mark.parametrize("name", ["grouped", "asym_pads", "dilation2", "im2col_stride2_asym", "im2col_dilation2"])
def test_conv_grad_matches_float64_torch(name, rng):
    torch = pytest.importorskip("torch")
    case = CONV_CASES[name]
    model, out, w_shape = _conv_grad_model(case)
    feeds = _conv_feeds(case, out, w_shape, 2, rng)
    got = _run(lower_training_model(model)[0], feeds)
    x = torch.tensor(feeds["X"], dtype=torch.float64, requires_grad=True)
    w = torch.tensor(feeds["W"], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(case["c_out"], dtype=torch.float64, requires_grad=True)
    r = len(case["k"])
    pads = case["pads"]
    padded = torch.nn.functional.pad(x, [p for i in reversed(range(r)) for p in (pads[i], pads[i + r])])
    y = torch.nn.functional.conv2d(padded, w, b, stride=case["strides"], dilation=case["dil"], groups=case["group"])
    y.backward(torch.tensor(feeds["dY"], dtype=torch.float64))
    np.testing.assert_allclose(got["dX"], x.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["dW"], w.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["dB"], b.grad.numpy(), rtol=1e-5, atol=1e-5)


# -- normalization, pooling, pointwise, loss, structural -----------------------------------------


@pytest.mark.parametrize(
    "shape", [(2, 5, 4, 3), (1, 7, 9, 10), (8, 64, 16, 16), (3, 16, 7, 7), (2, 3, 2, 3), (2, 4, 3, 5, 7), (4, 6, 11), (6, 5)]
)
def test_batch_norm_is_bit_identical(shape, rng):
    """The lowered training-mode BatchNorm computes in the CPU kernel's order, so its outputs equal ORT's bit
    for bit: a forward pass that differs in the last bit moves ReLU inputs near 0 across the kink, and the
    two backends' steps then differ by percents on a deep network (ResNet-50, batch statistics). The
    gradient's dScale and dBias are bit-identical too; dX is within rounding."""
    c, rest = shape[1], ["N", *shape[1:]]
    nodes = [
        helper.make_node("BatchNormInternal", ["X", "s", "b", "m", "v"], ["Y", "rm", "rv", "sm", "sis"], domain=MS,
                         name="bn", epsilon=1e-5, momentum=0.9, training_mode=1),
        helper.make_node("BatchNormalizationGrad", ["dY", "X", "s", "sm", "sis"], ["dX", "ds", "db"], domain=MS,
                         name="bn_grad", epsilon=1e-5),
    ]  # fmt: skip
    inputs = [_vi("X", rest), _vi("dY", rest)] + [_vi(n, [c]) for n in "sbmv"]
    outs = [_vi("Y", rest), _vi("dX", rest)] + [_vi(n, [c]) for n in ("rm", "rv", "sm", "sis", "ds", "db")]
    feeds = {
        "X": (rng.standard_normal(shape) * 3 + 0.7).astype(np.float32),
        "dY": rng.standard_normal(shape).astype(np.float32),
        "s": rng.standard_normal(c).astype(np.float32),
        "b": rng.standard_normal(c).astype(np.float32),
        "m": rng.standard_normal(c).astype(np.float32),
        "v": rng.uniform(0.5, 2, c).astype(np.float32),
    }
    model = _model(nodes, inputs, outs)
    lowered, report = lower_training_model(model)
    assert report.lowered == {"BatchNormInternal": 1, "BatchNormalizationGrad": 1}
    _check_portable(lowered)
    want, got = _run(model, feeds), _run(lowered, feeds)
    for k in want:
        if k == "dX":
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("pads,strides", [((0, 0, 0, 0), (2, 2)), ((1, 1, 1, 1), (2, 2)), ((0, 0, 1, 1), (1, 1))])
def test_max_pool_grad(pads, strides, rng):
    shape = [2, 3, 7, 7]
    nodes = [
        helper.make_node("MaxPool", ["X"], ["Y", "I"], kernel_shape=[3, 3], pads=list(pads), strides=list(strides)),
        helper.make_node("MaxPoolGrad", ["dY", "I"], ["dX"], kernel_shape=[3, 3], pads=list(pads), strides=list(strides), name="mpg"),
    ]
    out = [_out_size(7, 3, strides[i], 1, pads[i], pads[i + 2]) for i in range(2)]
    model = _model(nodes, [_vi("X", shape), _vi("dY", [2, 3, *out])], [_vi("dX", shape)])
    feeds = {"X": rng.standard_normal(shape).astype(np.float32), "dY": rng.standard_normal((2, 3, *out)).astype(np.float32)}
    assert _compare(model, feeds).lowered == {"MaxPoolGrad": 1}


@pytest.mark.parametrize(
    "kernel,strides,pads,include",
    [([2, 2], [2, 2], [0, 0, 0, 0], 0), ([3, 3], [1, 1], [1, 1, 1, 1], 0), ([3, 3], [2, 2], [1, 1, 1, 1], 1), ([5], [1], [2, 2], 1)],
)
def test_average_pool_grad(kernel, strides, pads, include, rng):
    r = len(kernel)
    spatial = [8] * r
    out = [_out_size(8, kernel[i], strides[i], 1, pads[i], pads[i + r]) for i in range(r)]
    node = helper.make_node("AveragePoolGrad", ["dY"], ["dX"], name="apg", kernel_shape=kernel, strides=strides, pads=pads,
                            count_include_pad=include)  # fmt: skip
    model = _model([node], [_vi("dY", [2, 3, *out])], [_vi("dX", [2, 3, *spatial])], value_info=[_vi("dX", [2, 3, *spatial])])
    feeds = {"dY": rng.standard_normal((2, 3, *out)).astype(np.float32)}
    assert _compare(model, feeds).lowered == {"AveragePoolGrad": 1}


def _unary_grad_model(op, **attrs):
    node = helper.make_node(op, ["dY", "Y"], ["dX"], domain=MS, name=op.lower(), **attrs)
    return _model([node], [_vi("dY", ["N", 4, 5]), _vi("Y", ["N", 4, 5])], [_vi("dX", ["N", 4, 5])])


@pytest.mark.parametrize(
    "op,attrs",
    [("ReluGrad", {}), ("SigmoidGrad", {}), ("SoftmaxGrad_13", {"axis": 1}), ("SoftmaxGrad_13", {"axis": -1}),
     ("SoftmaxGrad", {"axis": 1}), ("LogSoftmaxGrad_13", {"axis": -1}), ("LogSoftmaxGrad", {"axis": 1})],
)  # fmt: skip
def test_pointwise_and_softmax_grads(op, attrs, rng):
    y = rng.uniform(-1, 1, (3, 4, 5)).astype(np.float32)
    if "Softmax" in op:
        y = np.exp(y) / np.exp(y).sum(axis=attrs["axis"], keepdims=True)
        y = np.log(y) if op.startswith("Log") else y
    feeds = {"dY": rng.standard_normal((3, 4, 5)).astype(np.float32), "Y": y.astype(np.float32)}
    assert _compare(_unary_grad_model(op, **attrs), feeds).lowered == {op: 1}


@pytest.mark.parametrize("scale_down", [0, 1])
def test_scale(scale_down, rng):
    node = helper.make_node("Scale", ["X", "s"], ["Y"], domain=MS, name="scale", scale_down=scale_down)
    model = _model([node], [_vi("X", ["N", 4]), _vi("s", [])], [_vi("Y", ["N", 4])])
    _compare(model, {"X": rng.standard_normal((3, 4)).astype(np.float32), "s": np.array(7.0, np.float32)})


def test_div_grad_with_broadcasting(rng):
    node = helper.make_node("DivGrad", ["dY", "A", "B"], ["dA", "dB"], domain=MS, name="div_grad")
    model = _model([node], [_vi("dY", [2, 3, 4, 5]), _vi("A", [2, 3, 4, 5]), _vi("B", [1, 3, 1, 5])],
                   [_vi("dA", [2, 3, 4, 5]), _vi("dB", [1, 3, 1, 5])])  # fmt: skip
    feeds = {
        "dY": rng.standard_normal((2, 3, 4, 5)).astype(np.float32),
        "A": rng.standard_normal((2, 3, 4, 5)).astype(np.float32),
        "B": rng.uniform(0.5, 2, (1, 3, 1, 5)).astype(np.float32),
    }
    _compare(model, feeds)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted,ignore", [(False, False), (True, False), (False, True), (True, True)])
def test_softmax_cross_entropy_loss_grad(reduction, weighted, ignore, rng):
    n, c = 6, 5
    inputs = ["dY", "log_prob", "label"] + (["w"] if weighted else [])
    attrs = {"ignore_index": 3} if ignore else {}
    node = helper.make_node("SoftmaxCrossEntropyLossGrad", inputs, ["dX"], domain=MS, name="sce_grad", reduction=reduction, **attrs)
    dy_shape = ["N"] if reduction == "none" else []
    vis = [_vi("dY", dy_shape), _vi("log_prob", ["N", c]), _vi("label", ["N"], I64)]
    vis += [_vi("w", [c])] if weighted else []
    model = _model([node], vis, [_vi("dX", ["N", c])])
    logits = rng.standard_normal((n, c))
    feeds = {
        "dY": np.asarray(rng.standard_normal(n if reduction == "none" else ()), dtype=np.float32),
        "log_prob": (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32),
        "label": np.array([0, 3, 2, 3, 4, 1], np.int64),
    }
    if weighted:
        feeds["w"] = rng.uniform(0.5, 2, c).astype(np.float32)
    _compare(model, feeds)


def test_concat_and_split_training(rng):
    nodes = [
        helper.make_node("ConcatTraining", ["a", "b"], ["cat", "sizes"], domain=MS, name="cat", axis=1),
        helper.make_node("SplitTraining", ["dcat", "sizes"], ["da", "db"], domain=MS, name="split", axis=1),
    ]
    model = _model(
        nodes,
        [_vi("a", ["N", 2, 3]), _vi("b", ["N", 4, 3]), _vi("dcat", ["N", 6, 3])],
        [_vi("cat", ["N", 6, 3]), _vi("sizes", [2], I64), _vi("da", ["N", 2, 3]), _vi("db", ["N", 4, 3])],
    )
    feeds = {k: rng.standard_normal((2, s, 3)).astype(np.float32) for k, s in (("a", 2), ("b", 4), ("dcat", 6))}
    assert _compare(model, feeds).lowered == {"ConcatTraining": 1, "SplitTraining": 1}


def test_unknown_ops_are_named_on_one_line():
    nodes = [
        helper.make_node("FooGrad", ["x"], ["y"], domain=MS, name="a"),
        helper.make_node("FooGrad", ["y"], ["z"], domain=MS, name="b"),
        helper.make_node("BarOp", ["z"], ["w"], domain="org.example", name="c"),
        helper.make_node("ReluGrad", ["w", "x"], ["v"], domain=MS, name="fine"),
    ]
    model = _model(nodes, [_vi("x", [2])], [_vi("v", [2])])
    with pytest.raises(NeqError) as err:
        lower_training_model(model)
    message = str(err.value)
    assert "\n" not in message
    assert "FooGrad (nodes 'a', 'b')" in message and "BarOp (node 'c')" in message and "org.example" in message
    assert "ReluGrad" not in message


def test_registry_names_every_rule():
    assert {op for _, op in RULES} >= {"ConvGrad", "ReluGrad", "BatchNormInternal", "MaxPoolGrad", "AveragePoolGrad", "Scale"}


# -- end to end: prepared models ------------------------------------------------------------------


def _feeds(model: onnx.ModelProto, art: Path, batch: int, rng) -> dict[str, np.ndarray]:
    """Checkpoint values for parameters, random data, labels and masks, zero buffers, lazy_reset_grad=True."""
    state = training_api().CheckpointState.load_checkpoint(str(art / "checkpoint"))
    values = {name: p.data for name, p in state.parameters}
    feeds = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        if vi.name in values:
            feeds[vi.name] = values[vi.name]
        elif tt.elem_type == TensorProto.BOOL:
            feeds[vi.name] = np.ones(shape, bool)
        elif tt.elem_type == TensorProto.INT64:
            feeds[vi.name] = rng.integers(0, 3, shape).astype(np.int64)
        elif vi.name.endswith(".accumulation.buffer"):
            feeds[vi.name] = np.zeros(shape, np.float32)
        elif vi.name.endswith(".neq_mask"):
            feeds[vi.name] = (rng.random(shape) > 0.3).astype(np.float32)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _end_to_end(art: Path, batches=(2,), rtol=1e-4, rng=None):
    rng = rng or np.random.default_rng(0)
    model = onnx.load(str(art / "training_model.onnx"))
    lowered, report = lower_training_model(model)
    _check_portable(lowered)
    acc_outs = [o.name for o in model.graph.output if o.name.endswith("_grad.accumulation.out")]
    assert report.gradient_outputs == [n[: -len(".accumulation.out")] for n in acc_outs]
    lowered_inputs = [i.name for i in lowered.graph.input]
    assert lowered_inputs == [
        i.name for i in model.graph.input if not i.name.endswith(".accumulation.buffer") and i.name != "lazy_reset_grad"
    ]
    assert [o.name for o in lowered.graph.output] == [o.name for o in model.graph.output[:2]] + report.gradient_outputs
    original, portable = inference_session(model), inference_session(lowered)
    for batch in batches:
        feeds = _feeds(model, art, batch, rng)
        want = dict(zip([o.name for o in original.get_outputs()], original.run(None, feeds)))
        # with lazy_reset_grad the accumulators write each gradient into its (aliased) zero buffer
        for name in report.gradient_outputs:
            want[name] = feeds[f"{name}.accumulation.buffer"]
        got = dict(zip([o.name for o in portable.get_outputs()], portable.run(None, {k: feeds[k] for k in lowered_inputs})))
        for name, value in got.items():
            ref = want[name]
            scale = max(float(np.abs(ref).max()), 1e-2)  # grads that are 0 up to rounding (a bias before train-mode BN)
            np.testing.assert_allclose(value, ref, rtol=rtol, atol=rtol * scale, err_msg=name)
    return report


def test_tiny_model_end_to_end(tiny_artifacts):
    report = _end_to_end(tiny_artifacts, batches=(2, 5))
    assert "ConvGrad" in report.lowered and report.accumulators_removed == len(report.gradient_outputs)


def test_tiny_frozen_bn_end_to_end(frozen_bn_artifacts):
    _end_to_end(frozen_bn_artifacts["sgd"], batches=(1, 3))


def test_shipped_model_end_to_end():
    from onnx_neq.training.default_model import default_artifacts

    report = _end_to_end(default_artifacts(10), batches=(4,))
    assert report.lowered["ConvGrad"] == 52


def test_resnet18_train_bn_end_to_end(resnet18_artifacts):
    report = _end_to_end(resnet18_artifacts, batches=(8,), rtol=2e-4)
    assert {"BatchNormInternal", "BatchNormalizationGrad", "ReluGrad", "MaxPoolGrad"} <= report.lowered.keys()


FAST_ZOO = {"light_inception_v1", "light_squeezenet", "light_bvlc_alexnet"}


@pytest.fixture(scope="module")
def zoo_artifacts(tmp_path_factory):
    from onnx_neq.graph.prepare import prepare

    cache = {}

    def get(path: Path) -> Path:
        if path not in cache:
            cache[path] = tmp_path_factory.mktemp(path.stem) / "art"
            prepare(path, cache[path])
        return cache[path]

    return get


@pytest.mark.parametrize("path", [p for p in LIGHT_ZOO if p.stem in FAST_ZOO], ids=lambda p: p.stem[6:])
def test_zoo_lowers_to_standard_onnx(path, zoo_artifacts):
    lowered, report = lower_training_model(onnx.load(str(zoo_artifacts(path) / "training_model.onnx")))
    _check_portable(lowered)
    assert report.lowered["ConvGrad"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("path", LIGHT_ZOO, ids=lambda p: p.stem[6:])
def test_zoo_end_to_end(path, zoo_artifacts):
    _end_to_end(zoo_artifacts(path), batches=(1,), rtol=1e-3)


@pytest.mark.parametrize("include", [0, 1])
def test_average_pool_grad_3d_matches_torch(include, rng):
    """The LRN-as-AveragePool pattern (kernel [5, 1, 1] over an unsqueezed channel axis).

    ORT's 3-D AveragePoolGrad kernel assigns instead of accumulating, so the lowering follows the
    true gradient (torch) here, not that kernel (prepare rewrites such pools as convs anyway)."""
    torch = pytest.importorskip("torch")
    shape, out = [2, 1, 6, 4, 3], [2, 1, 6, 4, 3]
    node = helper.make_node("AveragePoolGrad", ["dY"], ["dX"], name="apg3", kernel_shape=[5, 1, 1], strides=[1, 1, 1],
                            pads=[2, 0, 0, 2, 0, 0], count_include_pad=include)  # fmt: skip
    model = _model([node], [_vi("dY", out)], [_vi("dX", shape)], value_info=[_vi("dX", shape)])
    dy = rng.standard_normal(out)
    got = _run(lower_training_model(model)[0], {"dY": dy.astype(np.float32)})["dX"]
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.avg_pool3d(x, (5, 1, 1), (1, 1, 1), (2, 0, 0), count_include_pad=bool(include))
    y.backward(torch.tensor(dy))
    np.testing.assert_allclose(got, x.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_keep_outputs_exposes_intermediate_values(tiny_artifacts, rng):
    model = onnx.load(str(tiny_artifacts / "training_model.onnx"))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormInternal")
    lowered, report = lower_training_model(model, keep_outputs=[bn.output[3]])
    _check_portable(lowered)
    assert lowered.graph.output[-1].name == bn.output[3] and bn.output[3] not in report.dropped_outputs
    feeds = _feeds(model, tiny_artifacts, 4, rng)
    got = _run(lowered, {i.name: feeds[i.name] for i in lowered.graph.input})
    c = got[bn.output[3]].shape
    assert c == (8,) and np.all(np.isfinite(got[bn.output[3]]))
