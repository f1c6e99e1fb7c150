"""export: torchvision state-dict keys, strict loading, head replacement, logits equal PyTorch's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from onnx_neq.architectures import build
from onnx_neq.export import export
from onnx_neq.graph.inference import to_inference_model
from onnx_neq.ort_runtime import inference_session

# Facts about torchvision's state dicts (torchvision.models.*().state_dict()), written down by hand.
TORCHVISION_KEYS = {
    "resnet18": (
        122,
        [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.conv2.weight",
            "layer2.0.downsample.0.weight",
            "layer4.1.bn2.num_batches_tracked",
            "fc.weight",
        ],
    ),
    "resnet50": (320, ["layer1.0.conv3.weight", "layer3.5.bn3.bias", "layer4.0.downsample.1.running_mean", "fc.bias"]),
    "mobilenet_v2": (
        314,
        [
            "features.0.0.weight",
            "features.1.conv.0.0.weight",
            "features.1.conv.1.weight",
            "features.2.conv.3.running_var",
            "features.18.1.bias",
            "classifier.1.weight",
        ],
    ),
}


@pytest.mark.parametrize("arch", list(TORCHVISION_KEYS))
def test_state_dict_keys_are_torchvision_keys(arch):
    keys = list(build(arch).state_dict())
    count, samples = TORCHVISION_KEYS[arch]
    assert len(keys) == count
    assert set(samples) <= set(keys)


def _random_pretrained(arch: str, path, num_classes=1000, width_mult=1.0, seed=3):
    """A stand-in for downloaded weights: random values, non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build(arch, num_classes, width_mult)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return model.eval()


@pytest.mark.parametrize(
    "arch,resolution,width", [("resnet18", 64, 1.0), ("mobilenet_v2", 64, 1.0), ("mobilenet_v2", 32, 0.35), ("resnet50", 64, 1.0)]
)
def test_exported_logits_match_pytorch(arch, resolution, width, tmp_path):
    reference = _random_pretrained(arch, tmp_path / "w.pth", width_mult=width)
    path = tmp_path / "m.onnx"
    export(arch, path, weights=tmp_path / "w.pth", resolution=resolution, width_mult=width)
    model = onnx.load(str(path))
    assert model.ir_version <= 10 and model.opset_import[0].version == 17
    x = np.random.default_rng(0).standard_normal((3, 3, resolution, resolution)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    out = inference_session(to_inference_model(model)).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_num_classes_replaces_the_head_and_keeps_the_rest(tmp_path):
    reference = _random_pretrained("resnet18", tmp_path / "w.pth")
    path = tmp_path / "m.onnx"
    report = export("resnet18", path, weights=tmp_path / "w.pth", num_classes=7, resolution=32)
    assert report.head_replaced
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert weights["fc.weight"].shape == (7, 512)
    np.testing.assert_array_equal(weights["layer3.1.conv2.weight"], reference.state_dict()["layer3.1.conv2.weight"].numpy())


def test_mismatched_weights_are_refused(tmp_path):
    from onnx_neq.errors import NeqError

    _random_pretrained("resnet18", tmp_path / "w.pth")
    with pytest.raises(NeqError, match="does not match"):
        export("resnet50", tmp_path / "m.onnx", weights=tmp_path / "w.pth", resolution=32)
