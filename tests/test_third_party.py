"""prepare on ONNX files nobody here exported: onnx's test zoo, Constant weights + Softmax output,
a MobileNetV3-style block; and every rewrite against the original op in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import onnx_model
from onnx import TensorProto, helper, numpy_helper

from onnx_neq.backends.ort_training import TrainingSession
from onnx_neq.errors import NeqError
from onnx_neq.ort_runtime import inference_session
from onnx_neq.prepare import prepare

ZOO = sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("light_*.onnx"))


def test_the_zoo_is_there():
    assert {p.stem[6:] for p in ZOO} >= {
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

    from onnx_neq.passes.activation_rewrites import ActivationRewritePass

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
    rewrite = ActivationRewritePass()
    rewrite(rewritten)
    proto = ir.serde.serialize_model(rewritten)
    assert op not in {n.op_type for n in proto.graph.node} and rewrite.rewritten == {op: 1}
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

    squeezenet = next(p for p in ZOO if p.stem == "light_squeezenet")
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


def test_control_flow_is_one_line_not_an_abort(tmp_path):
    """PyTorch exports LocalResponseNorm with an If node, on which ORT 1.19.2's gradient builder
    aborts the process; prepare names the node instead."""
    import torch

    from onnx_neq.export import export_module

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LocalResponseNorm(3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    export_module(model, tmp_path / "lrn.onnx", resolution=8)
    with pytest.raises(NeqError, match=r"control flow \(If '.*'\)"):
        prepare(tmp_path / "lrn.onnx", tmp_path / "art")
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
