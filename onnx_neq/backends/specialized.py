"""The specialised portable backend: every epoch's training graph computes only what the selection trains.

Like the portable backend (stock onnxruntime, host optimizer, .npz checkpoints), but `set_masks`
turns the selection into per-layer states (none | some | all) and runs a graph specialised to them
(graph/specialize.py): no weight gradient for frozen layers, no backward below the shallowest
selected layer, weight gradients only for the selected channels of partly selected layers (an index
input per layer). Graphs are cached by the tuple of states, so one graph serves every selection over
the same layers. Gradients exist only for what trains: the update memory is the budget (plus the
classifier and the BatchNorm parameters that train).

The graph it specialises is rebuilt from portable_training_model.onnx (training_graph_from_portable),
so it reads the same four artifact files as the portable backend: manifest.json,
portable_training_model.onnx, eval_model.onnx and parameters.npz (what a board holds).

SGD only (the paper's recipe): with SGD a step over the selected rows is the masked step exactly. An update
rule (set_update_rule: SCoTTi's momentum SGD) receives the selected rows' gradients with their row indices.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from onnx_neq.backends.base import PORTABLE, SPECIALIZED, f32
from onnx_neq.backends.portable import PortableBackend
from onnx_neq.backends.update_rules import Grads
from onnx_neq.errors import NeqError
from onnx_neq.graph.specialize import channel_inputs, layer_states, load_training_graph, specialize
from onnx_neq.ort_runtime import onnxruntime


class SpecializedBackend(PortableBackend):
    def __init__(
        self,
        artifacts_dir: str | Path,
        checkpoint: str | Path | None = None,
        threads: int = 0,
        bn_update: str = "always",
        memory_pattern: bool = False,
    ):
        self.bn_update = bn_update
        self._graphs: dict[tuple, tuple] = {}
        self.specialize_seconds = 0.0
        super().__init__(artifacts_dir, checkpoint, threads, memory_pattern)
        if self.manifest.optimizer != "sgd":
            raise NeqError(
                f"--backend {SPECIALIZED} trains with SGD (the paper's recipe); prepare with --optimizer sgd, or use --backend {PORTABLE}"
            )
        # rebuilt from portable_training_model.onnx: the backend reads the four files a board holds
        self._training_proto = load_training_graph(self.dir, self.manifest, "portable_training_model")
        self.set_masks(self.masks)

    def _prepare_training(self) -> None:
        """No masked training session: each selection gets its own (set_masks)."""

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        super().set_masks(masks)
        states = layer_states(self.manifest, self.masks)
        key = tuple(states[layer.name] for layer in self.manifest.layers)
        if key not in self._graphs:
            start = time.perf_counter()
            model, report = specialize(self._training_proto, self.manifest, states, self.bn_update)
            session = onnxruntime().InferenceSession(model.SerializeToString(), self.options, providers=["CPUExecutionProvider"])
            self._graphs = {key: (session, report)}  # the newest only: memory is what a board lacks
            self.specialize_seconds += time.perf_counter() - start
        self.session, self.report = self._graphs[key]
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.channels = channel_inputs(self.manifest, self.masks)
        self.rows = {
            param: self.channels[spec.channels_input]
            for name, spec in self.report.layers.items()
            if spec.channels_input
            for param in self._layer_params(name)
        }

    def _layer_params(self, name: str) -> list[str]:
        layer = self.layers[name]
        spec = self.report.layers[name]
        return [p for p in (layer.weight, layer.bias) if p] + (list(spec.bn_params) if self.bn_update == "selected" else [])

    def forward_backward(self, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the selection's graph by name (its gradients: the selected rows only)."""
        feeds = {self.manifest.input.name: f32(images), self.manifest.label_input: np.ascontiguousarray(labels, np.int64), **self.channels}
        feeds.update({name: value for name, value in self.params.items() if name in self.inputs})
        self._values = dict(zip(self.outputs, self.session.run(None, feeds)))
        return self._values

    def _outputs(self, values: dict[str, np.ndarray]) -> tuple[float, np.ndarray, list[np.ndarray]]:
        m = self.manifest
        return float(values[m.loss_output]), values[m.logits_output], [values[n] for n in self.stat_outputs]

    def _optimizer_step(self, lr: float) -> None:
        lr32 = np.float32(lr)
        for param, (grad, _rows) in self.gradients().items():
            self._sgd(param, grad, lr32)

    def gradients(self) -> Grads:
        """The last step's gradients, each (values, rows): a partly selected layer's hold its selected rows."""
        return {n[: -len("_grad")]: (v, self.rows.get(n[: -len("_grad")])) for n, v in self._values.items() if n.endswith("_grad")}

    def freeze_scaled_parameters(self) -> set[str]:
        """The conv weights, and with --bn-update selected the BatchNorm scales (as the authors' code scales BN weights)."""
        scales = {spec.bn_params[0] for spec in self.report.layers.values() if spec.bn_params} if self.bn_update == "selected" else set()
        return super().freeze_scaled_parameters() | scales

    def channel_parameters(self) -> dict[str, str]:
        """Each parameter whose rows freeze with a layer's channels -> the layer (BatchNorm's too with --bn-update selected)."""
        return {param: name for name in self.layers for param in self._layer_params(name)}

    def _sgd(self, param: str, grad: np.ndarray, lr: np.float32) -> None:
        """w = w + (-lr * g), ORT's SGD kernel, on the selected rows only."""
        w = self.params[param]
        rows = self.rows.get(param)
        if rows is None:
            np.add(w, -lr * grad, out=w)
        else:
            w[rows] = w[rows] + (-lr * grad)

    def update_bytes(self) -> int:
        """Gradient bytes of this selection (SGD keeps no optimizer state)."""
        total = 0
        for name, _shape in self.report.gradient_outputs:
            param = self.params[name[: -len("_grad")]]
            rows = self.rows.get(name[: -len("_grad")])
            total += param.itemsize * (param.size if rows is None else param[0].size * len(rows))
        return total

    def backward_macs(self) -> int:
        return self.report.backward_macs({name: int(len(idx)) for name, idx in self._k().items()})

    def _k(self) -> dict[str, np.ndarray]:
        return {name: self.channels[spec.channels_input] for name, spec in self.report.layers.items() if spec.channels_input}
