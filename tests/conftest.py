"""Shared fixtures: tiny CNNs built here, exported and prepared once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

# Where onnxruntime-training is not installed (stock onnxruntime: Python 3.13+, aarch64), a test that needs it
# (a comparison with the reference backend, its artifacts, its gradient graph) is reported as skipped, not
# failed: it failed only because the reference is missing, which onnx-neq itself says in these words.
_NEEDS_REFERENCE = (
    "onnxruntime-training",
    "names no training_model",
    "is not a registered function/op",  # ORT's training ops (ConvGrad, ...) exist only in its training build
    ", MaxPoolGrad,",
    ", AveragePoolGrad,",
    "'training_model'",
    "'checkpoint'",
    "'optimizer_model'",
    "training_model.onnx",
    "optimizer_model.onnx",
)


def _missing_reference(excinfo) -> bool:
    from onnx_neq.ort_runtime import has_training

    if excinfo is None or has_training():
        return False
    exc = excinfo.value
    while exc is not None:
        if any(marker in str(exc) for marker in _NEEDS_REFERENCE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def pytest_collection_modifyitems(config, items):
    """Tests marked `reference` (they patch or expect the ORT-training backend) skip where it is missing."""
    from onnx_neq.ort_runtime import has_training

    if has_training():
        return
    skip = pytest.mark.skip(reason="needs onnxruntime-training (requirements/ort-training.txt)")
    for item in items:
        if item.get_closest_marker("reference"):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _missing_reference(call.excinfo):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "needs onnxruntime-training (requirements/ort-training.txt)")


class TinyCNN(nn.Module):
    """Every Conv flavour prepare must handle: regular with bias, depthwise with bias, grouped."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 1, groups=4, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.grouped(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_tiny(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial running statistics, as in a pretrained model
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> tuple[Path, TinyCNN]:
    from onnx_neq.export import export_module

    model = make_tiny()
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    export_module(model, path, resolution=8)
    return path, model


@pytest.fixture(scope="session")
def tiny_frozen_bn_onnx(tmp_path_factory) -> Path:
    """The tiny model with BatchNorm on running statistics, so every conv bias gets a gradient."""
    from onnx_neq.export import export_module

    path = tmp_path_factory.mktemp("tiny") / "tiny_frozen_bn.onnx"
    export_module(make_tiny(), path, resolution=8, bn="frozen")
    return path


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_onnx, tmp_path_factory) -> Path:
    from onnx_neq.graph.prepare import prepare

    out = tmp_path_factory.mktemp("tiny_art") / "sgd"
    prepare(tiny_onnx[0], out)
    return out


@pytest.fixture(scope="session")
def frozen_bn_artifacts(tiny_frozen_bn_onnx, tmp_path_factory) -> dict[str, Path]:
    """SGD and AdamW (weight decay 0.1) artifacts of the frozen-BatchNorm tiny model."""
    from onnx_neq.graph.prepare import prepare

    root = tmp_path_factory.mktemp("tiny_art")
    prepare(tiny_frozen_bn_onnx, root / "sgd")
    prepare(tiny_frozen_bn_onnx, root / "adamw", optimizer="adamw", weight_decay=0.1)
    return {"sgd": root / "sgd", "adamw": root / "adamw"}


def onnx_model(nodes, inputs, outputs, initializers=(), opset: int = 17):
    """A ModelProto from onnx.helper pieces, at the IR version ORT 1.19.2 reads."""
    from onnx import helper

    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(initializers)), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 8
    return model


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A prepared-artifacts cache (~/.cache/onnx-neq) of the test's own: `pytestmark = pytest.mark.usefixtures("own_cache")`."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def resnet18_artifacts(tmp_path_factory) -> Path:
    """A randomly initialized (seed 0) ResNet-18 at 32 px with 10 classes, exported and prepared once."""
    from onnx_neq.export import export
    from onnx_neq.graph.prepare import prepare

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("resnet18")
    export("resnet18", root / "r18.onnx", num_classes=10, resolution=32)
    prepare(root / "r18.onnx", root / "art")
    return root / "art"
