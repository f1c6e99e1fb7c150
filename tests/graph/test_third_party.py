"""prepare on ONNX files nobody here exported: onnx's test zoo, Constant weights + Softmax output,
a MobileNetV3-style block; and every rewrite against the original op in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import onnx_model
from onnx import TensorProto, helper, numpy_helper
from support import LIGHT_ZOO

from onnx_neq.backends.ort_training import TrainingSession
from onnx_neq.errors import NeqError
from onnx_neq.graph.prepare import prepare
from onnx_neq.ort_runtime import inference_session


def test_the_zoo_is_there():
    assert {p.stem[6:] for p in LIGHT_ZOO} >= {
        "bvlc_alexnet",
        "densenet121",
        "inception_v1",
        "inception_v2",
        "resnet50",
        "shufflenet",
        "squeezenet",
        "vgg19",
        "zfnet512",
    }


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array.astype(np.float32), name))


def test_constant_weights_and_softmax_output(tmp_path, rng):
    """Paddle/TF style: weights in Constant nodes, probabilities at the output."""
    w, b = rng.standard_normal((6, 3, 3, 3)) * 0.3, rng.standard_normal(6) * 0.1
    fc, fb = rng.standard_normal((4, 6)) * 0.3, rng.standard_normal(4) * 0.1
    nodes = [
        _constant("w", w),
        _constant("b", b),
        _constant("fc", fc),
        _constant("fb", fb),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    model = onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(model, str(tmp_path / "paddle_like.onnx"))
    report = prepare(tmp_path / "paddle_like.onnx", tmp_path / "art")
    assert [l.weight for l in report.manifest.layers] == ["w"] and report.manifest.output_activation["op"] == "Softmax"
    session = TrainingSession(tmp_path / "art")
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    session.export_inference(tmp_path / "start.onnx")
    original = inference_session(model).run(None, {"x": x})[0]
    exported = inference_session(tmp_path / "start.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(exported, original, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exported.sum(axis=1), 1.0, rtol=1e-5)
    loss, _ = session.train_step(x, np.array([0, 1, 2]), 0.1)
    assert np.isfinite(loss) and not np.array_equal(session.parameter("w"), w.astype(np.float32))


def test_mobilenet_v3_block_with_hardswish_and_squeeze_excitation(tmp_path, rng):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
            self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
            self.se_reduce, self.se_expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
            self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = self.dw(self.expand(x))
            s = nn.functional.hardsigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
            return self.fc(self.project(x * s).mean((2, 3)))

    from onnx_neq.export import export_module

    export_module(Block(), tmp_path / "v3.onnx", resolution=8)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "v3.onnx")).graph.node}
    assert {"HardSwish", "HardSigmoid"} <= ops
    report = prepare(tmp_path / "v3.onnx", tmp_path / "art")
    assert report.normalized.rewritten["HardSwish"] == 2 and report.normalized.rewritten["HardSigmoid"] == 1
    assert [l.kind for l in report.manifest.layers] == ["conv", "depthwise", "conv", "conv", "conv"]
    session = TrainingSession(tmp_path / "art")
    before = session.parameter("se_reduce.weight").copy()
    for _ in range(2):
        loss, _ = session.train_step(rng.standard_normal((4, 3, 8, 8)).astype(np.float32), np.array([0, 1, 2, 0]), 0.1)
    assert np.isfinite(loss) and not np.array_equal(session.parameter("se_reduce.weight"), before)


REWRITE_CASES = {
    "HardSigmoid": (dict(alpha=0.3, beta=0.4), 1),
    "HardSwish": ({}, 1),
    "Softplus": ({}, 1),
    "Elu": (dict(alpha=0.7), 1),
    "GlobalMaxPool": ({}, 1),
    "Sum": ({}, 3),
    "PRelu": ({}, 2),
    "LRN": (dict(size=3, alpha=1e-3, beta=0.75, bias=2.0), 1),
    "AveragePool": (dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1]), 1),
    "AveragePool/include-pad": (dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), 1),
}


@pytest.mark.parametrize("op", list(REWRITE_CASES))
def test_rewrite_equals_the_original_op(op, rng):
    """Each rewrite against the original op, both run in onnxruntime, on values spanning both tails."""
    import onnx_ir as ir

    from onnx_neq.graph.passes.activation_rewrites import ActivationRewritePass

    attrs, arity = REWRITE_CASES[op]
    op = op.split("/")[0]
    names = [f"x{i}" for i in range(arity)]
    out_shape = {"GlobalMaxPool": ["N", 6, 1, 1], "AveragePool": ["N", 6, None, None]}.get(op, ["N", 6, 5, 5])
    model = onnx_model(
        [helper.make_node(op, names, ["y"], **attrs)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 6, 5, 5]) for n in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
    )
    rewritten = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))  # as prepare's convert_opset does
    result = ActivationRewritePass()(rewritten)
    proto = ir.serde.serialize_model(rewritten)
    assert op not in {n.op_type for n in proto.graph.node} and result.report.rewritten == {op: 1}
    onnx.checker.check_model(proto, full_check=True)
    feeds = {n: (rng.standard_normal((2, 6, 5, 5)) * 30).astype(np.float32) for n in names}
    feeds[names[0]][0, 0, 0, :3] = [0.0, 80.0, -80.0]  # Softplus/Elu where a naive form overflows
    expected = inference_session(model).run(None, feeds)[0]
    actual = inference_session(proto).run(None, feeds)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def _dynamic_conv_model(rng, opset: int, matmul_head: bool) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
    ]
    if matmul_head:
        inits += [
            numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fw"),
            numpy_helper.from_array(np.zeros(5, np.float32), "fb"),
        ]
        nodes += [helper.make_node("MatMul", ["f", "fw"], ["m"]), helper.make_node("Add", ["m", "fb"], ["y"])]
    else:
        inits += [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fw")]
        nodes += [helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)]
    model = onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
        opset=opset,
    )
    model.ir_version = 11 if opset >= 22 else 8
    return model


def test_newer_opset_and_dynamic_dims(tmp_path, rng):
    from onnx_neq.errors import NeqError

    path = tmp_path / "new.onnx"
    onnx.save(_dynamic_conv_model(rng, opset=22, matmul_head=False), str(path))
    with pytest.raises(NeqError, match="--input-shape"):
        prepare(path, tmp_path / "art")
    report = prepare(path, tmp_path / "art", input_shape=[1, 3, 12, 12])
    assert report.normalized.opset == (22, 17) and report.manifest.input.shape == [None, 3, 12, 12]
    training = onnx.load(str(tmp_path / "art" / "training_model.onnx"))
    assert training.ir_version <= 10 and training.opset_import[0].version == 17
    session = TrainingSession(tmp_path / "art")
    loss, _ = session.train_step(rng.standard_normal((3, 3, 12, 12)).astype(np.float32), np.array([0, 1, 4]), 0.1)
    assert np.isfinite(loss)  # batch 3 although the fixed shape said 1: the batch stays dynamic


def test_num_classes_replaces_matmul_add_and_conv_heads(tmp_path, rng):
    path = tmp_path / "mm.onnx"
    onnx.save(_dynamic_conv_model(rng, opset=17, matmul_head=True), str(path))
    manifest = prepare(path, tmp_path / "mm", input_shape=[1, 3, 8, 8], num_classes=9).manifest
    assert manifest.num_classes == 9 and manifest.classifier_params == 4 * 9 + 9
    logits = TrainingSession(tmp_path / "mm").eval_logits(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert logits.shape == (2, 9)

    squeezenet = next(p for p in LIGHT_ZOO if p.stem == "light_squeezenet")
    manifest = prepare(squeezenet, tmp_path / "sq", num_classes=7).manifest
    assert manifest.num_classes == 7 and manifest.classifier_params == 512 * 7 + 7  # conv10: 1x1, 512 -> 7, with bias
    session = TrainingSession(tmp_path / "sq")
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    loss, logits = session.train_step(x, np.array([6]), 0.01)
    assert logits.shape == (1, 7) and np.isfinite(loss)
    session.export_inference(tmp_path / "sq.onnx")  # the Softmax comes back, over 7 classes
    probs = inference_session(tmp_path / "sq.onnx").run(None, {session.manifest.input.name: x})[0]
    np.testing.assert_allclose(probs.reshape(-1).sum(), 1.0, rtol=1e-5)


def test_prelu_slope_stays_trainable(tmp_path, rng):
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.full((4, 1, 1), 0.25, np.float32), "slope"),
    ]
    inits.append(numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc"))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("PRelu", ["c", "slope"], ["a"], name="prelu"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    model = onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    onnx.save(model, str(tmp_path / "prelu.onnx"))
    report = prepare(tmp_path / "prelu.onnx", tmp_path / "art")
    assert report.normalized.rewritten == {"PRelu": 1} and report.manifest.other_params == 4
    session = TrainingSession(tmp_path / "art")
    session.train_step(rng.standard_normal((4, 3, 8, 8)).astype(np.float32), np.array([0, 1, 2, 3]), 0.5)
    assert not np.array_equal(session.parameter("slope"), np.full((4, 1, 1), 0.25, np.float32))


def test_control_flow_on_the_gradient_path_is_one_line(tmp_path):
    """PyTorch exports LocalResponseNorm with an If node whose branches pass the window average on (ORT 1.19.2's
    gradient builder aborts the process on it). The gradient would have to pass through the If, which has
    no rule: prepare names it on one line and writes nothing. (With LRN's small alpha, dropping that path
    would still match PyTorch within 1e-4, so only the builder's refusal can catch it.)"""
    import torch

    from onnx_neq.export import export_module

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LocalResponseNorm(3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    export_module(model, tmp_path / "lrn.onnx", resolution=8)
    with pytest.raises(NeqError, match=r"no gradient rule: If \(nodes '.*If'\)") as err:
        prepare(tmp_path / "lrn.onnx", tmp_path / "art")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "art").exists()


def _fixed_size_model(rng, flatten_head: bool) -> onnx.ModelProto:
    """Conv 3->4 (3x3, pad 1) + ReLU on fixed 8x8 inputs, then GlobalAveragePool+Flatten+Gemm (any size
    works) or Flatten+Gemm over 4*8*8 features (only 8x8 works); shapes inferred into the file, as
    exporters write them."""
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"])]
    width = 4 * 8 * 8 if flatten_head else 4
    if not flatten_head:
        nodes.append(helper.make_node("GlobalAveragePool", ["r"], ["g"]))
    nodes += [helper.make_node("Flatten", ["r" if flatten_head else "g"], ["f"]), helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)]
    inits.append(numpy_helper.from_array(rng.standard_normal((5, width)).astype(np.float32), "fw"))
    model = onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    return onnx.shape_inference.infer_shapes(model)


def test_input_shape_resizes_a_fully_convolutional_model(tmp_path, rng):
    """--input-shape on a model exported at 8x8 (stale inferred shapes in the file): 16x16 artifacts whose
    logits are onnxruntime's for the same network with its input dims freed."""
    model = _fixed_size_model(rng, flatten_head=False)
    assert len(model.graph.value_info) > 0  # the stale shapes this is about
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    manifest = prepare(path, tmp_path / "art", input_shape=[1, 3, 16, 16]).manifest
    assert manifest.input.shape == [None, 3, 16, 16] and manifest.layers[0].output_shape == [4, 16, 16]
    free = onnx.ModelProto()
    free.CopyFrom(model)
    del free.graph.value_info[:]
    for d, v in zip(free.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        d.dim_param = v
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    expected = inference_session(free).run(None, {"x": x})[0]
    np.testing.assert_allclose(TrainingSession(tmp_path / "art").eval_logits(x), expected, rtol=1e-5, atol=1e-5)


def test_input_shape_the_model_cannot_take_is_one_line(tmp_path, rng):
    path = tmp_path / "flat.onnx"
    onnx.save(_fixed_size_model(rng, flatten_head=True), str(path))
    with pytest.raises(NeqError, match=r"--input-shape 1,3,16,16: this model was built for 8x8 inputs") as error:
        prepare(path, tmp_path / "art", input_shape=[1, 3, 16, 16])
    assert "\n" not in str(error.value) and not (tmp_path / "art").exists()


def _paddle_weights(rng, classes: int) -> dict[str, np.ndarray]:
    arrays = {
        "conv1_w": rng.standard_normal((8, 3, 3, 3)) * 0.3,
        "bn_scale": rng.uniform(0.5, 1.5, 8),
        "bn_bias": rng.standard_normal(8) * 0.1,
        "bn_mean": rng.standard_normal(8) * 0.1,
        "bn_var": rng.uniform(0.5, 1.5, 8),
        "conv2_w": rng.standard_normal((12, 8, 3, 3)) * 0.2,
        "fc_w": rng.standard_normal((12, classes)) * 0.3,
        "fc_b": rng.standard_normal(classes) * 0.1,
    }
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def _paddle_classifier(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Paddle2ONNX-style text-direction classifier: a 48x192 input, weights in Constant nodes, Conv+BN+Relu,
    a strided Conv, hard-swish as x * HardSigmoid(x) (opset 11 has no HardSwish), Reshape [0, -1],
    MatMul + Add, Softmax and an Identity as the last node; opset 11, IR version 7."""
    classes = weights["fc_b"].size
    bn = [numpy_helper.from_array(weights[f"bn_{k}"], f"bn_{k}") for k in ("scale", "bias", "mean", "var")]
    nodes = [_constant(k, weights[k]) for k in ("conv1_w", "conv2_w", "fc_w", "fc_b")] + [
        helper.make_node("Constant", [], ["flat_shape"], value=numpy_helper.from_array(np.array([0, -1], np.int64))),
        helper.make_node("Conv", ["x", "conv1_w"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", *(t.name for t in bn)], ["b1"], epsilon=1e-5),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2_w"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("HardSigmoid", ["c2"], ["gate"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["c2", "gate"], ["h2"]),
        helper.make_node("GlobalAveragePool", ["h2"], ["pool"]),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["features"]),
        helper.make_node("MatMul", ["features", "fc_w"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["softmax"], axis=1),
        helper.make_node("Identity", ["softmax"], ["save_infer_model/scale_0.tmp_1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 48, 192])],
        [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_1", TensorProto.FLOAT, [-1, classes])],
        bn,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The same graph with other values as its outputs (shape left to onnxruntime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_paddle_style_48x192_classifier_keeps_its_logits_and_softmax(tmp_path, rng):
    """The eval graph's logits are onnxruntime's pre-Softmax values of the original model, and both
    backends' inference models give back its probabilities (rows summing to 1)."""
    from onnx_neq.backends.base import open_backend

    model = _paddle_classifier(_paddle_weights(rng, 4))
    onnx.save(model, str(tmp_path / "paddle.onnx"))
    report = prepare(tmp_path / "paddle.onnx", tmp_path / "art")
    manifest = report.manifest
    assert manifest.input.shape == [None, 3, 48, 192] and manifest.num_classes == 4 and len(manifest.layers) == 2
    removed = report.normalized.output_activation
    assert removed["op"] == "Softmax" and removed["axis"] in (1, -1) and removed["output"] == "save_infer_model/scale_0.tmp_1"
    assert manifest.classifier_params == 12 * 4 + 4
    x = rng.standard_normal((3, 3, 48, 192)).astype(np.float32)
    logits, probs = inference_session(_with_outputs(model, ["logits", "save_infer_model/scale_0.tmp_1"])).run(None, {"x": x})
    for backend in ("ort-training", "portable"):
        session = open_backend(backend, tmp_path / "art")
        np.testing.assert_allclose(session.eval_logits(x), logits, rtol=1e-5, atol=1e-5)
        session.export_inference(tmp_path / f"{backend}.onnx")
        exported = onnx.load(str(tmp_path / f"{backend}.onnx"))
        assert [o.name for o in exported.graph.output] == ["save_infer_model/scale_0.tmp_1"]
        out = inference_session(exported).run(None, {"x": x})[0]
        np.testing.assert_allclose(out, probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def _direction_npz(path: Path, per_class: int = 100) -> Path:
    """20x64 RGB uint8 images, 3 classes: class k is brighter in channel k (learnable in an epoch or two)."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), per_class)
    images = rng.integers(0, 120, (labels.size, 20, 64, 3))
    images[np.arange(labels.size), :, :, labels] += 100
    order = rng.permutation(labels.size)
    images, labels = images[order].astype(np.uint8), labels[order]
    cut = labels.size * 4 // 5
    np.savez(path, x_train=images[:cut], y_train=labels[:cut], x_test=images[cut:], y_test=labels[cut:])
    return path


@pytest.mark.parametrize("backend", ["ort-training", "portable"])
def test_paddle_style_classifier_with_num_classes_trains_on_non_square_images(tmp_path, rng, monkeypatch, backend):
    """prepare --num-classes 3 on the 48x192 Paddle-style model, 2 epochs on 20x64 images, `eval` on the
    run's model.onnx; that model is the original graph (Softmax included) with the trained weights."""
    import csv

    from click.testing import CliRunner

    from onnx_neq.cli import main
    from onnx_neq.training.train import TrainConfig, train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    onnx.save(_paddle_classifier(_paddle_weights(rng, 4)), str(tmp_path / "paddle.onnx"))
    report = prepare(tmp_path / "paddle.onnx", tmp_path / "art", num_classes=3)
    assert report.head_replaced == (4, 3) and report.manifest.num_classes == 3
    assert report.manifest.classifier_params == 12 * 3 + 3
    data = f"npz:{_direction_npz(tmp_path / 'direction.npz')}"
    run = tmp_path / "run"
    train(TrainConfig(str(tmp_path / "art"), data, str(run), epochs=2, warmup_epochs=0, lr=0.05, backend=backend, threads=1))
    with open(run / "metrics.csv") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    result = CliRunner().invoke(main, ["eval", str(run / "model.onnx"), "--data", data])
    assert result.exit_code == 0 and "top-1" in result.output and "on 60 test images" in result.output, result.output

    trained = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(run / "model.onnx")).graph.initializer}
    weights = {name: trained[name] for name in _paddle_weights(rng, 3)}
    assert weights["fc_w"].shape == (12, 3) and not np.allclose(
        weights["bn_scale"], _paddle_weights(np.random.default_rng(0), 4)["bn_scale"]
    )
    x = rng.standard_normal((4, 3, 48, 192)).astype(np.float32)
    expected = inference_session(_paddle_classifier(weights)).run(None, {"x": x})[0]
    actual = inference_session(run / "model.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(actual.sum(axis=1), 1.0, rtol=1e-5)


def _shape_constant(name: str, dims: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(dims, np.int64)))


TAILS = {  # nodes after the MatMul + Add head (its output "a", 4 classes) up to the graph output "y"
    "Identity-Cast-Reshape": [
        helper.make_node("Identity", ["a"], ["t1"]),
        helper.make_node("Cast", ["t1"], ["t2"], to=TensorProto.FLOAT),
        _shape_constant("to_2d", [-1, 4]),
        helper.make_node("Reshape", ["t2", "to_2d"], ["y"]),
    ],
    "Softmax-Cast-Reshape-Flatten": [
        helper.make_node("Softmax", ["a"], ["t1"], axis=1),
        helper.make_node("Cast", ["t1"], ["t2"], to=TensorProto.FLOAT),
        _shape_constant("to_4d", [0, 4, 1, 1]),
        helper.make_node("Reshape", ["t2", "to_4d"], ["t3"]),
        helper.make_node("Flatten", ["t3"], ["y"]),
    ],
    "Reshape-LogSoftmax-Identity-Squeeze": [
        _shape_constant("to_4d", [0, 4, 1, 1]),
        helper.make_node("Reshape", ["a", "to_4d"], ["t1"]),
        helper.make_node("LogSoftmax", ["t1"], ["t2"], axis=1),
        helper.make_node("Identity", ["t2"], ["t3"]),
        _shape_constant("axes", [2, 3]),
        helper.make_node("Squeeze", ["t3", "axes"], ["y"]),
    ],
}


def _small_classifier(rng, tail: list[onnx.NodeProto], extra_outputs=()) -> onnx.ModelProto:
    """Conv 3->4 + Relu on 8x8, GlobalAveragePool, Flatten "f", MatMul + Add "a" [N, 4], then `tail` to "y";
    `extra_outputs` (name, shape) are appended after "y" (the name "aux": a second Conv branch)."""
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "w_aux"),
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "fw"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "fb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fw"], ["m"]),
        helper.make_node("Add", ["m", "fb"], ["a"]),
        *tail,
    ]
    if any(name == "aux" for name, _ in extra_outputs):
        nodes.append(helper.make_node("Conv", ["x", "w_aux"], ["aux"], name="conv_aux"))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in [("y", ["N", 4]), *extra_outputs]]
    model = onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], outputs, inits)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("tail", list(TAILS))
def test_head_and_output_activation_found_through_value_keeping_nodes(tail, tmp_path, rng):
    """--num-classes 3 behind Identity / Cast / Reshape / Flatten / Squeeze (a Reshape to [.., 4, ..] follows
    the new class count): the eval logits are the features (onnxruntime on the original model) times the new
    head, and the inference model ends in the original activation over them."""
    model = _small_classifier(rng, TAILS[tail])
    onnx.save(model, str(tmp_path / "m.onnx"))
    report = prepare(tmp_path / "m.onnx", tmp_path / "art", num_classes=3)
    activation = next((op for op in tail.split("-") if op.endswith("Softmax")), None)
    assert report.head_replaced == (4, 3) and report.manifest.num_classes == 3
    assert (report.manifest.output_activation or {}).get("op") == activation
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    features = inference_session(_with_outputs(model, ["f"])).run(None, {"x": x})[0]
    session = TrainingSession(tmp_path / "art")
    expected = features @ session.parameter("fw") + session.parameter("fb")
    assert session.parameter("fw").shape == (4, 3)
    np.testing.assert_allclose(session.eval_logits(x), expected, rtol=1e-5, atol=1e-5)
    session.export_inference(tmp_path / "inference.onnx")
    exported = inference_session(tmp_path / "inference.onnx")
    assert [o.name for o in exported.get_outputs()] == ["y"]
    by_hand = {None: expected, "Softmax": _softmax(expected), "LogSoftmax": np.log(_softmax(expected))}[activation]
    np.testing.assert_allclose(exported.run(None, {"x": x})[0], by_hand, rtol=1e-5, atol=1e-5)


def test_two_outputs_keep_the_first_when_it_holds_class_scores(tmp_path, rng):
    """Class scores first, a feature map of another branch second: that branch goes (its Conv is no layer),
    the summary says so, and the inference model gives the first output's values."""
    model = _small_classifier(rng, TAILS["Softmax-Cast-Reshape-Flatten"], [("aux", ["N", 2, 8, 8])])
    onnx.save(model, str(tmp_path / "two.onnx"))
    report = prepare(tmp_path / "two.onnx", tmp_path / "art")
    assert report.normalized.dropped_outputs == ["aux"] and [l.node for l in report.manifest.layers] == ["conv"]
    assert any(line.startswith("outputs    dropped 'aux'") for line in report.normalized.lines())
    session = TrainingSession(tmp_path / "art")
    session.export_inference(tmp_path / "inference.onnx")
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    expected = inference_session(model).run(["y"], {"x": x})[0]
    exported = inference_session(tmp_path / "inference.onnx")
    assert [o.name for o in exported.get_outputs()] == ["y"]
    np.testing.assert_allclose(exported.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)


def test_two_outputs_without_class_scores_first_are_one_line(tmp_path, rng):
    """A feature map first, the class scores second: exit 2 and one line naming every output."""
    from click.testing import CliRunner

    from onnx_neq.cli import main

    model = _small_classifier(rng, TAILS["Identity-Cast-Reshape"], [("aux", ["N", 2, 8, 8])])
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend(outputs[::-1])
    onnx.save(model, str(tmp_path / "two.onnx"))
    with pytest.raises(NeqError, match=r"2 outputs \('aux' \[N, 2, 8, 8\], 'y' \[N, 4\]\).*classifier's output first"):
        prepare(tmp_path / "two.onnx", tmp_path / "art")
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "two.onnx"), "-o", str(tmp_path / "art")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("onnx-neq: error: the model has 2 outputs"), result.output
    assert not (tmp_path / "art").exists()
