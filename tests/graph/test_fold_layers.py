"""fold_layers on inference models of tiny torch CNNs: identity layers merged into the conv after them,
always-OFF and all-zero layers replaced by constants, the rest skipped with a reason. The reference is
onnxruntime running the original model (after onnx's full checker accepts the folded one) on inputs where the
claims about the activations hold (checked in torch: a big positive or negative BatchNorm bias)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_testing import run_ort

from onnx_neq.errors import NeqError
from onnx_neq.graph.fold_layers import check_equal, fold_layers

torch = pytest.importorskip("torch")
nn = torch.nn

ATOL = 1e-5


class Stack(nn.Module):
    """conv{i} + bn{i} + act per spec (out channels, kernel, stride, padding), global mean, linear head."""

    def __init__(self, specs, act=nn.ReLU, in_channels: int = 3):
        super().__init__()
        self.n = len(specs)
        for i, (out, kernel, stride, padding) in enumerate(specs):
            self.add_module(f"conv{i}", nn.Conv2d(in_channels, out, kernel, stride, padding, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(out))
            self.add_module(f"act{i}", act())
            in_channels = out
        self.fc = nn.Linear(in_channels, 5)

    def forward(self, x):
        for i in range(self.n):
            x = getattr(self, f"act{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TwoConsumers(nn.Module):
    """stem conv + bn + relu read by two 1x1 convs whose outputs are added."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc((self.a(x) + self.b(x)).mean(dim=(2, 3)))


class Residual(nn.Module):
    """A ResNet basic block: stem, conv1 + bn1 + relu, conv2 + bn2, + stem, relu."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.relu(x + y).mean(dim=(2, 3)))


def _built(module: nn.Module, biases: dict[str, float] | None = None) -> nn.Module:
    """`module` with seeded weights, non-trivial running statistics, BatchNorm weight 0.5 and the given biases."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.fill_(0.5)
                m.bias.uniform_(-0.5, 0.5)
                if name in (biases or {}):
                    m.bias.fill_(biases[name])
    return module


def _inference(module: nn.Module, tmp_path, resolution: int) -> onnx.ModelProto:
    """The model as ORT runs it for inference (BatchNormalization nodes in inference mode)."""
    from onnx_neq.export import export_module
    from onnx_neq.graph.inference import to_inference_model

    export_module(module, tmp_path / "model.onnx", resolution)
    return to_inference_model(onnx.load(str(tmp_path / "model.onnx")))


def _images(resolution: int, n: int = 6) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, resolution, resolution)).astype(np.float32)


def _pre_activation(module: nn.Module, bn: str, x: np.ndarray) -> np.ndarray:
    """The output of BatchNorm `bn` in torch (what the activation after it reads) on images `x`."""
    seen = []
    hook = getattr(module, bn).register_forward_hook(lambda m, i, o: seen.append(o.detach().numpy()))
    with torch.no_grad():
        module.eval()(torch.from_numpy(x))
    hook.remove()
    return seen[0]


def _assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, x: np.ndarray) -> None:
    """onnxruntime on the original model is the reference; the folded model must pass onnx's full checker."""
    want, got = run_ort(original, {"input": x}), run_ort(folded, {"input": x})
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=ATOL)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


# identity layers ------------------------------------------------------------------------------------------------


def test_identity_layer_merges_into_the_next_1x1_conv(tmp_path):
    module = _built(Stack([(8, 3, 1, 1), (6, 1, 1, 0)]), {"bn0": 4.0})
    x = _images(8)
    assert _pre_activation(module, "bn0", x).min() > 0  # the ReLU is ON for every input: the identity
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, {"conv0.weight"}, set())
    assert report.folded == ["conv0.weight"] and not report.constant and not report.skipped
    assert report.nodes_after < report.nodes_before == len(model.graph.node)
    assert report.params_after < report.params_before
    assert _ops(folded).count("Conv") == 1 and "Relu" in _ops(folded)  # conv1's ReLU gone, conv2's kept
    assert _initializer(folded, "conv1.weight").shape == (6, 3, 3, 3)  # the merged conv: conv1's kernel, conv2's name
    _assert_same_outputs(model, folded, x)
    assert check_equal(model, folded, x) <= ATOL


def test_a_chain_of_identity_layers_merges_in_turn(tmp_path):
    module = _built(Stack([(8, 3, 2, 1), (8, 1, 1, 0), (6, 1, 1, 0)]), {"bn0": 4.0, "bn1": 4.0})
    x = _images(8)
    assert _pre_activation(module, "bn0", x).min() > 0 and _pre_activation(module, "bn1", x).min() > 0
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, {"conv0.weight", "conv1.weight"}, set())
    assert report.folded == ["conv0.weight", "conv1.weight"]
    assert _ops(folded).count("Conv") == 1 and _ops(folded).count("Relu") == 1
    _assert_same_outputs(model, folded, x)


def test_leaky_relu_folds_when_on_and_is_no_constant_when_off(tmp_path):
    module = _built(Stack([(8, 3, 1, 1), (6, 1, 1, 0)], act=nn.LeakyReLU), {"bn0": 4.0})
    x = _images(8)
    assert _pre_activation(module, "bn0", x).min() > 0
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, {"conv0.weight"}, set())
    assert report.folded == ["conv0.weight"] and _ops(folded).count("LeakyRelu") == 1
    _assert_same_outputs(model, folded, x)
    folded, report = fold_layers(model, set(), {"conv0.weight"})
    assert "slope" in report.skipped["conv0.weight"] and _ops(folded) == _ops(model)


def test_3x3_after_3x3_with_padding_is_skipped_and_the_model_unchanged(tmp_path):
    module = _built(Stack([(8, 3, 1, 1), (6, 3, 1, 1)]), {"bn0": 4.0})
    x = _images(8)
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, {"conv0.weight"}, set())
    assert not report.folded and "padding" in report.skipped["conv0.weight"]
    assert "not a linear map" in report.skipped["conv0.weight"]
    assert report.nodes_after == report.nodes_before and report.params_after == report.params_before
    assert _ops(folded) == _ops(model)
    _assert_same_outputs(model, folded, x)


def test_a_layer_at_1x1_merges_into_a_padded_3x3_conv_by_its_centre_tap(tmp_path):
    """ResNet-18's layer4 at 32 px: the map is 1x1, so of the next 3x3 conv (padding 1) only the centre tap reads it."""
    module = _built(Stack([(8, 3, 2, 1), (8, 3, 2, 1), (6, 3, 1, 1)]), {"bn1": 4.0})
    x = _images(4)  # 4 -> 2 -> 1 -> 1
    assert _pre_activation(module, "bn1", x).shape[2:] == (1, 1) and _pre_activation(module, "bn1", x).min() > 0
    model = _inference(module, tmp_path, 4)
    folded, report = fold_layers(model, {"conv1.weight"}, set())
    assert report.folded == ["conv1.weight"] and not report.skipped
    assert _initializer(folded, "conv2.weight").shape == (6, 8, 3, 3)  # conv1's kernel now, conv2's channels
    assert report.params_after < report.params_before and report.nodes_after < report.nodes_before
    _assert_same_outputs(model, folded, x)


def test_two_consumers_are_skipped(tmp_path):
    module = _built(TwoConsumers(), {"bn": 4.0})
    x = _images(8)
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, {"stem.weight"}, set())
    assert not report.folded and "2 consumers" in report.skipped["stem.weight"]
    assert _ops(folded) == _ops(model)
    _assert_same_outputs(model, folded, x)


def test_an_activation_that_is_not_the_identity_on_the_data_fails_the_check(tmp_path):
    module = _built(Stack([(8, 3, 1, 1), (6, 1, 1, 0)]))  # BatchNorm bias in [-0.5, 0.5]: the ReLU cuts
    x = _images(8)
    assert _pre_activation(module, "bn0", x).min() < 0
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, {"conv0.weight"}, set())
    assert report.folded == ["conv0.weight"]  # folding takes the claim on trust; the check refutes it
    with pytest.raises(NeqError, match="not the identity"):
        check_equal(model, folded, x)


# constant layers ------------------------------------------------------------------------------------------------


def test_always_off_layer_becomes_a_constant(tmp_path):
    module = _built(Stack([(8, 3, 1, 1), (8, 3, 1, 1), (6, 3, 1, 1)]), {"bn1": -50.0})
    x = _images(8)
    assert _pre_activation(module, "bn1", x).max() < 0  # the ReLU is OFF for every input: 0
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, set(), {"conv1.weight"})
    assert report.constant == ["conv1.weight"] and not report.skipped
    assert report.dead == ["conv0.weight"]  # conv1 was the only reader of conv0's output
    assert "conv1.weight" not in {i.name for i in folded.graph.initializer}
    assert "Expand" in _ops(folded)  # a Conv reads the constant: the full map, its batch read from the input
    assert report.nodes_after < report.nodes_before and report.params_after < report.params_before
    _assert_same_outputs(model, folded, x)
    _assert_same_outputs(model, folded, x[:1])  # another batch size


def test_all_zero_weights_become_act_of_the_batchnorm_bias(tmp_path):
    module = _built(Stack([(8, 3, 1, 1), (8, 3, 1, 1), (6, 3, 1, 1)]))
    with torch.no_grad():
        module.conv1.weight.zero_()
        module.bn1.bias.copy_(torch.linspace(-1, 1, 8))  # ReLU(BN(0)) is 0 on some channels, not on others
    x = _images(8)
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, set(), {"conv1.weight"})
    assert report.constant == ["conv1.weight"] and not report.skipped
    assert report.params_after < report.params_before
    _assert_same_outputs(model, folded, x)


def test_a_zero_residual_branch_is_a_broadcast_constant_and_its_feeder_dies(tmp_path):
    module = _built(Residual())
    with torch.no_grad():
        module.conv2.weight.zero_()
    x = _images(8)
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, set(), {"conv2.weight"})
    assert report.constant == ["conv2.weight"] and report.dead == ["conv1.weight"]
    assert _ops(folded).count("Conv") == 1 and "Expand" not in _ops(folded)
    add = next(node for node in folded.graph.node if node.op_type == "Add")
    shapes = {i.name: tuple(i.dims) for i in folded.graph.initializer}
    assert any(shapes.get(name) == (1, 8, 1, 1) for name in add.input)  # the Add broadcasts it
    _assert_same_outputs(model, folded, x)


def test_two_constants_meeting_at_an_add_keep_the_batch(tmp_path):
    module = _built(TwoConsumers())
    with torch.no_grad():
        module.a.weight.zero_()
        module.b.weight.zero_()
    x = _images(8)
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, set(), {"a.weight", "b.weight"})
    assert report.constant == ["a.weight", "b.weight"] and report.dead == ["stem.weight"]
    assert "Conv" not in _ops(folded) and "Expand" in _ops(folded)  # one of the two is the full map
    _assert_same_outputs(model, folded, x)


def test_constants_of_one_shape_share_the_nodes_that_size_them(tmp_path):
    module = _built(Residual())
    with torch.no_grad():
        module.stem.weight.zero_()
        module.conv1.weight.zero_()
    x = _images(8)
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, set(), {"stem.weight", "conv1.weight"})
    assert report.constant == ["stem.weight", "conv1.weight"] and not report.dead
    assert [_ops(folded).count(op) for op in ("Shape", "Concat", "Expand", "Conv")] == [1, 1, 2, 1]
    _assert_same_outputs(model, folded, x)
    _assert_same_outputs(model, folded, x[:2])


def test_an_off_layer_without_activation_is_skipped(tmp_path):
    module = _built(Residual())
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, set(), {"conv2.weight"})  # its weights are not zero, no ReLU after its BN
    assert not report.constant and "not constant" in report.skipped["conv2.weight"]
    assert _ops(folded) == _ops(model)


class Block(nn.Module):
    """A ResNet basic block: conv1 + bn1 + relu, conv2 + bn2, + the input (or its 1x1 strided downsample), relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride > 1 else None

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """Stem conv + bn + relu, a block, a block with a downsample shortcut, global mean, linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.layer1, self.layer2 = Block(8, 8, 1), Block(8, 16, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.layer2(self.layer1(x)).mean(dim=(2, 3)))


def test_zero_layers_of_a_pruned_resnet_fold_together_within_float32_rounding(tmp_path):
    """What pruning leaves: all-zero convs (the stem's and a downsample block's) and tiny running variances, so
    BatchNorm scales ~300 and logits ~1e6 (ResNet-18's: ~6e7). Folded, ORT fuses the graph otherwise (the block's
    zero branch, a [1, C, 1, 1] constant, goes into the shortcut conv's bias) and float32 rounds otherwise: ulps
    of the logits, above any absolute tolerance. check_equal allows that much relative to them, not a wrong claim."""
    from onnx_neq.backends.base import open_backend
    from onnx_neq.export import export_module
    from onnx_neq.graph.prepare import prepare

    module = _built(ResNet())
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(1e-6, 1e-5)
            if isinstance(m, nn.Conv2d) and name in ("stem", "layer2.conv1", "layer2.conv2"):
                m.weight.zero_()
    x = _images(8)
    export_module(module, tmp_path / "net.onnx", 8, bn="frozen")
    prepare(tmp_path / "net.onnx", tmp_path / "art")
    open_backend("portable", tmp_path / "art").export_inference(tmp_path / "inference.onnx")
    model = onnx.load(str(tmp_path / "inference.onnx"))
    zero = ["stem.weight", "layer2.conv1.weight", "layer2.conv2.weight"]
    folded, report = fold_layers(model, set(), set(zero))
    assert report.constant == zero and not report.dead and not report.skipped
    assert _ops(folded).count("Conv") == 3  # layer1's and the downsample's
    want, got = run_ort(model, {"input": x})[0], run_ort(folded, {"input": x})[0]
    scale = float(np.abs(want).max())
    assert scale > 1e4 and np.abs(got - want).max() <= ATOL * scale
    assert check_equal(model, folded, x) <= ATOL * scale
    wrong, _ = fold_layers(model, set(), {"layer1.conv1.weight"})  # its ReLU is not OFF on these images
    with pytest.raises(NeqError, match="not constant"):
        check_equal(model, wrong, x)


# the decomposed BatchNorm and Clip ------------------------------------------------------------------------------


class MobileBlock(nn.Module):
    """MobileNet-like, ReLU6 activations: stem 3x3, squeeze 1x1, depthwise 3x3, project 1x1 (linear)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.squeeze, self.bn1 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.project, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = nn.functional.relu6(self.bn0(self.stem(x)))
        x = nn.functional.relu6(self.bn1(self.squeeze(x)))
        x = nn.functional.relu6(self.bn2(self.dw(x)))
        return self.fc(self.bn3(self.project(x)).mean(dim=(2, 3)))


def test_decomposed_batchnorm_and_clip_from_export_inference(tmp_path):
    from onnx_neq.backends.base import open_backend
    from onnx_neq.export import export_module
    from onnx_neq.graph.prepare import prepare

    module = _built(MobileBlock(), {"bn0": 3.0, "bn2": -50.0})
    x = _images(8)
    stem = _pre_activation(module, "bn0", x)
    assert 0 < stem.min() and stem.max() < 6 and _pre_activation(module, "bn2", x).max() < 0  # Clip(0, 6): identity; OFF
    export_module(module, tmp_path / "block.onnx", 8, bn="frozen")
    prepare(tmp_path / "block.onnx", tmp_path / "art")
    open_backend("portable", tmp_path / "art").export_inference(tmp_path / "inference.onnx")
    model = onnx.load(str(tmp_path / "inference.onnx"))
    assert "BatchNormalization" not in _ops(model) and "Clip" in _ops(model) and "Sqrt" in _ops(model)  # the affine form
    folded, report = fold_layers(model, {"stem.weight", "squeeze.weight", "project.weight"}, set())
    assert report.folded == ["stem.weight"] and not report.constant
    assert "grouped" in report.skipped["squeeze.weight"]  # a depthwise conv reads it
    assert "ReduceMean" in report.skipped["project.weight"]  # no conv after it
    assert report.nodes_after < report.nodes_before and report.params_after < report.params_before
    _assert_same_outputs(model, folded, x)
    folded, report = fold_layers(model, set(), {"dw.weight"})
    assert report.constant == ["dw.weight"] and report.dead == ["squeeze.weight", "stem.weight"]  # only dw read them
    assert _ops(folded).count("Conv") == 1 and "Clip" not in _ops(folded)
    _assert_same_outputs(model, folded, x)


def test_a_merge_that_would_grow_the_model_is_skipped(tmp_path):
    model = _inference(_built(Stack([(8, 3, 1, 1), (32, 1, 1, 0)]), {"bn0": 4.0}), tmp_path, 8)
    folded, report = fold_layers(model, {"conv0.weight"}, set())  # 32 * 3 * 9 weights > 8 * 3 * 9 + 32 * 8
    assert not report.folded and "larger" in report.skipped["conv0.weight"]
    assert _ops(folded) == _ops(model)


# errors ---------------------------------------------------------------------------------------------------------


def test_unknown_or_doubly_listed_layers_are_refused(tmp_path):
    model = _inference(_built(Stack([(8, 3, 1, 1), (6, 1, 1, 0)])), tmp_path, 8)
    with pytest.raises(NeqError, match="name no Conv weight"):
        fold_layers(model, {"conv9.weight"}, set())
    with pytest.raises(NeqError, match="both as identity and as constant"):
        fold_layers(model, {"conv0.weight"}, {"conv0.weight"})


# always-OFF channels --------------------------------------------------------------------------------------------


def _off_biases(module: nn.Module, off: dict[str, list[int]]) -> nn.Module:
    """`module` with the BatchNorm biases of the given channels at -50 (their activation OFF on any image), of
    the others at 1 (ON on some pixels)."""
    with torch.no_grad():
        for bn, channels in off.items():
            getattr(module, bn).bias.fill_(1.0)
            getattr(module, bn).bias[channels] = -50.0
    return module


def _always_off(module: nn.Module, bn: str, x: np.ndarray) -> np.ndarray:
    """The channels whose activation after BatchNorm `bn` reads <= 0 on every image of `x` (what the caller measures)."""
    return np.all(_pre_activation(module, bn, x) <= 0, axis=(0, 2, 3))


def _macs(model: onnx.ModelProto, tmp_path) -> int:
    from onnx_neq.results.model_compare import model_facts

    onnx.save(model, str(tmp_path / "macs.onnx"))
    return model_facts("model", tmp_path / "macs.onnx").macs


def test_off_channels_before_a_padded_3x3_conv_are_dropped(tmp_path):
    module = _off_biases(_built(Stack([(8, 3, 1, 1), (8, 3, 1, 1), (6, 3, 1, 1)])), {"bn0": [1, 4, 6], "bn1": [0, 3], "bn2": [2]})
    x = _images(8)
    off = {f"conv{i}.weight": _always_off(module, f"bn{i}", x) for i in range(3)}
    assert [list(np.flatnonzero(m)) for m in off.values()] == [[1, 4, 6], [0, 3], [2]]  # the others are ON somewhere
    model = onnx.shape_inference.infer_shapes(_inference(module, tmp_path, 8))  # value_info to keep consistent
    assert model.graph.value_info
    folded, report = fold_layers(model, set(), set(), off)
    assert report.dropped_channels == {"conv0.weight": 3, "conv1.weight": 2} and not report.folded and not report.constant
    assert "ReduceMean" in report.skipped["conv2.weight"]  # no conv after it to take its channels
    assert _initializer(folded, "conv0.weight").shape == (5, 3, 3, 3)
    assert _initializer(folded, "conv1.weight").shape == (6, 5, 3, 3)  # rows of conv1's, input channels of conv0's gone
    assert _initializer(folded, "conv2.weight").shape == (6, 6, 3, 3)
    assert _ops(folded).count("BatchNormalization") == 1  # folded into the two convs, conv2's kept
    assert report.params_after < report.params_before and _macs(folded, tmp_path) < _macs(model, tmp_path)
    _assert_same_outputs(model, folded, x)
    assert check_equal(model, folded, x) <= ATOL
    assert check_equal(model, folded, _images(8, 3)[:, ::-1].copy()) <= ATOL  # other images: bias -50 keeps them OFF


class MobileExpand(nn.Module):
    """ReLU6 activations: stem 3x3, a 3x3 conv, expand 1x1, depthwise 3x3, project 1x1 (linear)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.conv, self.bn1 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.expand, self.bn2 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn3 = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.project, self.bn4 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        for conv, bn in (("stem", "bn0"), ("conv", "bn1"), ("expand", "bn2"), ("dw", "bn3")):
            x = nn.functional.relu6(getattr(self, bn)(getattr(self, conv)(x)))
        return self.fc(self.bn4(self.project(x)).mean(dim=(2, 3)))


def test_relu6_off_channels_drop_before_a_dense_conv_not_around_a_depthwise_one(tmp_path):
    from onnx_neq.backends.base import open_backend
    from onnx_neq.export import export_module
    from onnx_neq.graph.prepare import prepare

    module = _off_biases(_built(MobileExpand()), {"bn0": [2, 5], "bn2": [3, 7, 11], "bn3": [0]})
    x = _images(8)
    off = {f"{conv}.weight": _always_off(module, bn, x) for conv, bn in (("stem", "bn0"), ("expand", "bn2"), ("dw", "bn3"))}
    assert [int(m.sum()) for m in off.values()] == [2, 3, 1]
    export_module(module, tmp_path / "block.onnx", 8, bn="frozen")
    prepare(tmp_path / "block.onnx", tmp_path / "art")
    open_backend("portable", tmp_path / "art").export_inference(tmp_path / "inference.onnx")
    model = onnx.load(str(tmp_path / "inference.onnx"))
    assert "BatchNormalization" not in _ops(model) and _ops(model).count("Clip") == 4  # the decomposed affine form
    folded, report = fold_layers(model, set(), set(), off)
    assert report.dropped_channels == {"stem.weight": 2}
    assert "grouped" in report.skipped["expand.weight"]  # the depthwise conv reads it
    assert "grouped" in report.skipped["dw.weight"]  # it is the depthwise conv
    assert _initializer(folded, "stem.weight").shape == (6, 3, 3, 3) and _initializer(folded, "conv.weight").shape == (8, 6, 3, 3)
    assert _ops(folded).count("Clip") == 4 and report.nodes_after < report.nodes_before
    assert report.params_after < report.params_before and _macs(folded, tmp_path) < _macs(model, tmp_path)
    _assert_same_outputs(model, folded, x)
    assert check_equal(model, folded, x) <= ATOL


def test_off_channels_that_cannot_go_are_skipped_with_the_reason(tmp_path):
    x = _images(8)
    for act, why in ((nn.LeakyReLU, "slope"), (lambda: nn.Hardtanh(-1.0, 6.0), "lower bound is -1")):
        model = _inference(_built(Stack([(8, 3, 1, 1), (6, 3, 1, 1)], act=act)), tmp_path, 8)
        folded, report = fold_layers(model, set(), set(), {"conv0.weight": np.arange(8) < 2})
        assert not report.dropped_channels and why in report.skipped["conv0.weight"] and _ops(folded) == _ops(model)
    model = _inference(_built(TwoConsumers()), tmp_path, 8)
    folded, report = fold_layers(model, set(), set(), {"stem.weight": np.arange(8) < 2})
    assert "2 consumers" in report.skipped["stem.weight"] and _ops(folded) == _ops(model)
    module = _off_biases(_built(Stack([(8, 3, 1, 1), (8, 3, 1, 1), (6, 3, 1, 1)])), {"bn0": list(range(8)), "bn1": [1]})
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, set(), set(), {"conv0.weight": np.ones(8, bool)})
    assert "constant" in report.skipped["conv0.weight"] and not report.dropped_channels
    one = np.arange(8) == 1
    folded, report = fold_layers(model, set(), {"conv1.weight"}, {"conv0.weight": one})
    assert report.constant == ["conv1.weight"] and report.dead == ["conv0.weight"]  # folded away: not looked at
    assert not report.dropped_channels and not report.skipped
    folded, report = fold_layers(model, {"conv1.weight"}, set(), {"conv1.weight": one})  # a padded 3x3 after it
    assert "not a linear map" in report.skipped["conv1.weight"] and "listed as identity" in report.skipped["conv1.weight"]
    assert not report.dropped_channels and _ops(folded) == _ops(model)
    _assert_same_outputs(model, folded, x)
    with pytest.raises(NeqError, match="bool array over the conv's 8 output channels"):
        fold_layers(model, set(), set(), {"conv0.weight": np.ones(6, bool)})
    with pytest.raises(NeqError, match="name no Conv weight"):
        fold_layers(model, set(), set(), {"conv9.weight": one})


def test_a_channel_passed_as_off_that_is_not_fails_the_check(tmp_path):
    module = _off_biases(_built(Stack([(8, 3, 1, 1), (6, 3, 1, 1)])), {"bn0": [1]})
    x = _images(8)
    assert list(np.flatnonzero(_always_off(module, "bn0", x))) == [1]  # channel 0 is ON on some pixels
    model = _inference(module, tmp_path, 8)
    folded, report = fold_layers(model, set(), set(), {"conv0.weight": np.isin(np.arange(8), [0, 1])})
    assert report.dropped_channels == {"conv0.weight": 2}  # folding takes the claim on trust; the check refutes it
    with pytest.raises(NeqError, match="not OFF"):
        check_equal(model, folded, x)
