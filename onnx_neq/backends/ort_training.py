"""One ORT training session over an artifacts directory, driven through the manifest.

Imports onnxruntime.training.api only (never torch). Masks are float32 vectors, one per
layer, 1 = train the channel, 0 = freeze it. With SGD the masked gradient is an exact freeze;
with AdamW the optimizer still moves zero-gradient weights (moments, weight decay), so after
each step the frozen channels are written back from a snapshot taken when the masks were set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from onnx_neq.backends.base import checked_masks, f32, updated_running_statistics
from onnx_neq.manifest import Manifest, artifact_model, artifact_path, read_manifest
from onnx_neq.ort_runtime import captured_native_stderr, onnxruntime, session_options, training_api


class TrainingSession:
    def __init__(self, artifacts_dir: str | Path, checkpoint: str | Path | None = None, threads: int = 0):
        self.dir = Path(artifacts_dir)
        self.manifest: Manifest = read_manifest(self.dir)
        api = training_api()
        files = {k: artifact_model(self.dir, self.manifest, k) for k in ("training_model", "eval_model", "optimizer_model")}
        files["checkpoint"] = artifact_path(self.dir, self.manifest.files.get("checkpoint", "checkpoint"))
        with captured_native_stderr():
            self.state = api.CheckpointState.load_checkpoint(os.fspath(checkpoint or files["checkpoint"]))
            self.module = api.Module(files["training_model"], self.state, files["eval_model"], session_options=session_options(threads))
            self.optimizer = api.Optimizer(files["optimizer_model"], self.module)
        self.layers = {layer.name: layer for layer in self.manifest.layers}
        self.masks = {name: np.ones(layer.out_channels, np.float32) for name, layer in self.layers.items()}
        self._frozen: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # masks -------------------------------------------------------------------------------
    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        """Set the per-channel masks by layer name (missing layers keep their current mask)."""
        self.masks.update(checked_masks(self.layers, masks))
        self._snapshot_frozen()

    def _snapshot_frozen(self) -> None:
        self._frozen = {}
        if self.manifest.optimizer == "sgd":
            return
        for name, mask in self.masks.items():
            rows = np.flatnonzero(mask == 0)
            if rows.size == 0:
                continue
            layer = self.layers[name]
            for param in filter(None, (layer.weight, layer.bias)):
                self._frozen[param] = (rows, self.state.parameters[param].data[rows].copy())

    def _restore_frozen(self) -> None:
        for param, (rows, values) in self._frozen.items():
            data = self.state.parameters[param].data
            data[rows] = values
            self.state.parameters[param] = data

    # steps -------------------------------------------------------------------------------
    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        """One optimizer step on a batch; returns (loss, logits)."""
        self.module.train()
        self.optimizer.set_learning_rate(float(lr))
        masks = [self.masks[layer.name] for layer in self.manifest.layers]
        outputs = self.module(f32(images), labels.astype(np.int64), *masks)
        loss, logits = outputs[:2]
        if self.manifest.bn_stats:
            self._update_running_statistics(outputs[2 : 2 + 2 * len(self.manifest.bn_stats)], len(images))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        if self._frozen:
            self._restore_frozen()
        return float(loss), logits

    def _update_running_statistics(self, outputs, batch: int) -> None:
        for name, value in updated_running_statistics(self.manifest, outputs, batch, lambda n: self.state.parameters[n].data):
            self.state.parameters[name] = value

    def eval_batch(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits and the raw Conv outputs (taps, by layer name) of a batch in inference mode."""
        outputs = self._eval(images)
        taps = [t.numpy() for t in outputs[2:]]
        return outputs[1].numpy(), {layer.name: tap for layer, tap in zip(self.manifest.layers, taps)}

    def eval_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits only: the taps stay in ORT's memory, uncopied."""
        return self._eval(images)[1].numpy()

    def _eval(self, images: np.ndarray):
        ort = onnxruntime()
        self.module.eval()
        x = ort.OrtValue.ortvalue_from_numpy(f32(images))
        labels = ort.OrtValue.ortvalue_from_numpy(np.zeros(len(images), np.int64))
        return self.module(x, labels)

    # parameters --------------------------------------------------------------------------
    def parameter(self, name: str) -> np.ndarray:
        return self.state.parameters[name].data

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies: ORT's arrays change in place with every step."""
        return {name: np.array(p.data) for name, p in self.state.parameters}

    def save_checkpoint(self, path: str | Path) -> None:
        """Parameters and optimizer state (AdamW moments), for an exact resume. ORT reports a failed
        write as a RuntimeError; it becomes the OSError it stands for (disk full, or the reason given)."""
        try:
            with captured_native_stderr():
                training_api().CheckpointState.save_checkpoint(self.state, os.fspath(path), include_optimizer_state=True)
        except RuntimeError as exc:
            raise _write_error(Path(path), exc) from None

    specialize_seconds = 0.0  # one graph for every selection

    def update_bytes(self) -> int:
        """ORT keeps a gradient buffer (and AdamW's two moments) for every trainable parameter."""
        state = 3 if self.manifest.optimizer == "adamw" else 1
        trainable = {p for layer in self.manifest.layers for p in (layer.weight, layer.bias) if p} | set(self.manifest.always_trained)
        return state * sum(self.state.parameters[p].data.nbytes for p in trainable)

    def backward_macs(self) -> int:
        from onnx_neq.graph.specialize import full_backward_macs

        return full_backward_macs(self.dir, self.manifest)

    @staticmethod
    def read_parameters(path: str | Path, names: list[str]) -> dict[str, np.ndarray]:
        return checkpoint_parameters(path, names)

    def export_inference(self, path: str | Path) -> None:
        """Write an inference model (current weights, logits only, no masks or taps)."""
        with captured_native_stderr():
            self.module.export_model_for_inferencing(os.fspath(path), [self.manifest.logits_output])
        if self.manifest.output_activation:
            import onnx

            from onnx_neq.graph.passes.output_activation import append_output_activation

            onnx.save(append_output_activation(onnx.load(os.fspath(path)), self.manifest.output_activation), os.fspath(path))


def checkpoint_parameters(path: str | Path, names: list[str]) -> dict[str, np.ndarray]:  # noqa: D103 (see TrainingSession.read_parameters)
    """Parameters read straight from a checkpoint file, without building ORT sessions."""
    with captured_native_stderr():
        state = training_api().CheckpointState.load_checkpoint(os.fspath(path))
    return {name: state.parameters[name].data for name in names}


def _write_error(path: Path, exc: Exception) -> OSError:
    import errno
    import shutil

    try:
        full = shutil.disk_usage(path.parent).free < 1 << 20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
    return OSError(errno.EIO, f"the checkpoint could not be written ({reason[:160]})", str(path))
