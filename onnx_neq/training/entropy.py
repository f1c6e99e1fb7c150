"""The entropy of each prunable layer's activation over the training data (Entropy-Guided Pruning).

The eval graph (BatchNorm on running statistics, as the authors measure in eval mode) with the input of
the activation after each conv as an extra output (graph/passes/activation_inputs.py) runs over the
training images in batches with the current weights. Per batch and channel, ON is where the activation
passes its input on: x > 0 for Relu and LeakyRelu, low < x < high for Clip (ReLU6: 0 < x < 6; above 6 the
output is as constant as below 0). selection/egp.py turns the per-batch ON fractions into the layer's
entropy; a channel ON for every image and position is always ON, one at or below the low bound for all
is always OFF (its output is the constant low bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_neq.backends.base import f32
from onnx_neq.data.datasets import Split
from onnx_neq.graph.passes.activation_inputs import ActivationInputPass, PairedActivation
from onnx_neq.manifest import Manifest, artifact_model
from onnx_neq.ort_runtime import onnxruntime, session_options
from onnx_neq.selection.egp import LayerEntropy
from onnx_neq.training.setup import prep


@dataclass
class LayerActivity:
    """One prunable layer's activation over the data."""

    pairing: PairedActivation
    entropy: LayerEntropy
    always_below: np.ndarray | None = None  # per channel: x <= low for every image and position

    @property
    def value(self) -> float:
        return self.entropy.value

    @property
    def identity(self) -> bool:
        """Every channel always ON: the activation passes its input on unchanged on this data."""
        return self.entropy.always_on is not None and bool(self.entropy.always_on.all())

    @property
    def constant(self) -> bool:
        """Every channel always at or below the low bound: the activation's output is constant on this data."""
        return self.always_below is not None and bool(self.always_below.all())


class EntropyProbe:
    """The eval graph with activation inputs exposed, in one InferenceSession; `measure` runs it over a split."""

    def __init__(self, artifacts: str | Path, manifest: Manifest, parameters: dict[str, np.ndarray], threads: int = 0):
        import onnx
        import onnx_ir as ir

        model = ir.from_proto(onnx.load(str(artifact_model(artifacts, manifest, "eval_model"))))
        result = ActivationInputPass(manifest.layers, manifest.input.name, parameters)(model)
        self.paired = {p.layer: p for p in result.report.paired}
        self.manifest = manifest
        proto = ir.to_proto(result.model)
        self.session = onnxruntime().InferenceSession(
            proto.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def measure(self, parameters: dict[str, np.ndarray], split: Split, batch_size: int) -> dict[str, LayerActivity]:
        """Per paired layer, its activation's entropy and ON/OFF channels over `split` with `parameters`."""
        activity = {name: LayerActivity(p, LayerEntropy()) for name, p in self.paired.items()}
        names = [p.output for p in self.paired.values()]
        feeds = {k: v for k, v in parameters.items() if k in self.inputs}
        for start in range(0, len(split), batch_size):
            images = prep(self.manifest, split.images[start : start + batch_size])
            feeds[self.manifest.input.name] = f32(images)
            feeds[self.manifest.label_input] = np.zeros(len(images), np.int64)
            for layer, x in zip(self.paired, self.session.run(names, feeds)):
                _add(activity[layer], x)
        return activity


def _add(activity: LayerActivity, x: np.ndarray) -> None:
    p = activity.pairing
    on = (x > p.low) & (x < p.high)
    channels = np.moveaxis(on, 1, 0).reshape(on.shape[1], -1)
    activity.entropy.add_fraction(channels.mean(axis=1, dtype=np.float64))
    below = np.moveaxis(x <= p.low, 1, 0).reshape(on.shape[1], -1).all(axis=1)
    activity.always_below = below if activity.always_below is None else activity.always_below & below
