"""The portable backend (lowered graph on stock-onnxruntime kernels, host optimizer) against the
ORT training backend, the independent reference: one SGD step from the same weights must agree
within 1e-4 relative (loss and each updated tensor), for every kind of model that prepares."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from support import LIGHT_ZOO

from onnx_neq.backends.base import ORT_TRAINING, PORTABLE, open_backend
from onnx_neq.graph.prepare import prepare


def assert_same_step(artifacts, x, y, lr=0.01, masks=None) -> None:
    ort, portable = open_backend(ORT_TRAINING, artifacts), open_backend(PORTABLE, artifacts)
    if masks:
        ort.set_masks(masks)
        portable.set_masks(masks)
    before = portable.parameters()
    loss_o, logits_o = ort.train_step(x, y, lr)
    loss_p, logits_p = portable.train_step(x, y, lr)
    assert loss_p == pytest.approx(loss_o, rel=1e-4)
    assert np.linalg.norm(logits_p - logits_o) <= 1e-4 * np.linalg.norm(logits_o)
    after_o, after_p = ort.parameters(), portable.parameters()
    for name, old in before.items():
        # + 1e-6: a conv bias right before a batch-statistics BatchNorm stays ~1e-9 (its gradient is round-off)
        assert np.linalg.norm(after_p[name] - after_o[name]) <= 1e-4 * np.linalg.norm(after_o[name]) + 1e-6, name
        update_o, update_p = after_o[name] - old, after_p[name] - old
        # the step itself: 1e-3 (a BatchNorm scale's gradient is a cancelling sum), plus the float32 rounding
        # of the parameter it is added to
        if np.linalg.norm(update_o) > 1e-6:
            assert np.linalg.norm(update_p - update_o) <= 1e-3 * np.linalg.norm(update_o) + 1e-6 * np.linalg.norm(old), name


def _batch(artifacts, n, rng):
    from onnx_neq.manifest import read_manifest

    m = read_manifest(artifacts)
    return rng.standard_normal((n, *m.input.shape[1:])).astype(np.float32), rng.integers(0, m.num_classes, n)


def test_tiny_models(tiny_artifacts, frozen_bn_artifacts, rng):
    for artifacts in (tiny_artifacts, frozen_bn_artifacts["sgd"], frozen_bn_artifacts["adamw"]):
        assert_same_step(artifacts, *_batch(artifacts, 6, rng))


def test_with_masks(frozen_bn_artifacts, rng):
    from onnx_neq.manifest import read_manifest

    artifacts = frozen_bn_artifacts["adamw"]
    masks = {layer.name: (rng.random(layer.out_channels) < 0.5).astype(np.float32) for layer in read_manifest(artifacts).layers}
    assert_same_step(artifacts, *_batch(artifacts, 6, rng), masks=masks)


def test_shipped_model(rng):
    from onnx_neq.training.default_model import default_artifacts

    artifacts = default_artifacts(5)
    assert_same_step(artifacts, *_batch(artifacts, 8, rng))


@pytest.mark.parametrize("bn", ["train", "frozen"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "resnet50"])
def test_torchvision_architectures(arch, bn, tmp_path, rng):
    """ResNet-18 at 32 px, MobileNetV2 0.35 and ResNet-50 at 64 px, batch 8, random weights."""
    torch = pytest.importorskip("torch")
    from onnx_neq.architectures import build
    from onnx_neq.export import export

    torch.manual_seed(0)
    width = 0.35 if arch == "mobilenet_v2" else 1.0
    model = build(arch, num_classes=10, width_mult=width) if arch == "mobilenet_v2" else build(arch, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    export(arch, tmp_path / "m.onnx", tmp_path / "w.pth", 10, 32 if arch == "resnet18" else 64, width, bn)
    prepare(tmp_path / "m.onnx", tmp_path / "art")
    assert_same_step(tmp_path / "art", *_batch(tmp_path / "art", 8, rng))


# the largest models of the zoo take 10-50 s each: they run with the whole-command tests (-m e2e), in CI
LARGE_ZOO = {"light_vgg19", "light_zfnet512", "light_densenet121", "light_inception_v2", "light_resnet50", "light_bvlc_alexnet"}


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=pytest.mark.e2e) if p.stem in LARGE_ZOO else p for p in LIGHT_ZOO], ids=lambda p: p.stem[6:]
)
def test_light_zoo(path, tmp_path, rng):
    """Every model of onnx's light test zoo prepares, and takes the same SGD step on both backends. Their
    weights are placeholders: this tests graph handling, not accuracy."""
    source = onnx.load(str(path))
    convs = sum(n.op_type == "Conv" for n in source.graph.node)
    # SqueezeNet's classifier is its 1x1 conv10, Caffe2's DenseNet-121's the 1x1 conv fc6 after pooling
    head_conv = path.stem in ("light_squeezenet", "light_densenet121")
    manifest = prepare(path, tmp_path / "art").manifest
    assert len(manifest.layers) == convs - head_conv and manifest.num_classes == 1000
    x, y = _batch(tmp_path / "art", 1, rng)
    assert_same_step(tmp_path / "art", x * 0.1, y, lr=1e-4)
