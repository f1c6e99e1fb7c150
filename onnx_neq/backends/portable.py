"""The portable backend: stock onnxruntime, no training kernels (aarch64 boards, Python 3.13+).

portable_training_model.onnx (the lowered training graph: loss, logits, one masked gradient per
trainable parameter, BatchNorm batch statistics) runs in an InferenceSession; the update is
applied on the host by backends/host_optim.py with ORT's optimizer semantics. Parameters live in
numpy arrays that ONNX Runtime reads in place (OrtValues over the same memory, bound once with
IOBinding), and gradients are written straight into preallocated arrays: no per-step copies of
the weights. Evaluation runs eval_model.onnx, the same graph the ORT backend evaluates.

Checkpoints are .npz files: every parameter (frozen ones too: BatchNorm running statistics) and
the optimizer state under "optimizer/".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onnx_neq.backends.base import checked_masks, f32, updated_running_statistics
from onnx_neq.backends.host_optim import optimizer_for_manifest
from onnx_neq.backends.update_rules import Grads, RuleHost, UpdateRule, rule_step
from onnx_neq.errors import NeqError
from onnx_neq.manifest import Manifest, artifact_model, artifact_path, read_manifest
from onnx_neq.ort_runtime import ORT_DTYPES, onnxruntime, session_options

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

OPTIMIZER_PREFIX = "optimizer/"


class PortableBackend(RuleHost):
    def __init__(self, artifacts_dir: str | Path, checkpoint: str | Path | None = None, threads: int = 0, memory_pattern: bool = False):
        self.dir = Path(artifacts_dir)
        self.manifest: Manifest = read_manifest(self.dir)
        files = self.manifest.files
        if "portable_training_model" not in files or "parameters" not in files:
            raise NeqError(f"{self.dir} has no portable training model (prepared by an older onnx-neq); run `onnx-neq prepare` again")
        self.options = session_options(threads, memory_pattern)
        stored = _load_npz(checkpoint or artifact_path(self.dir, files["parameters"]))
        self.params = {k: np.ascontiguousarray(v, dtype=v.dtype) for k, v in stored.items() if not k.startswith(OPTIMIZER_PREFIX)}
        self.optimizer = optimizer_for_manifest(self.manifest)
        if checkpoint is not None:
            self.optimizer.load_state_dict({k[len(OPTIMIZER_PREFIX) :]: v for k, v in stored.items() if k.startswith(OPTIMIZER_PREFIX)})
        self.layers = {layer.name: layer for layer in self.manifest.layers}
        self.masks = {name: np.ones(layer.out_channels, np.float32) for name, layer in self.layers.items()}
        self.param_masks = _parameter_masks(self.layers, self.masks)
        self.rule: UpdateRule | None = None
        self.recomputed = 0  # steps whose gradients an update rule's wider masks made compute again
        self._prepare_bindings()

    # bindings ------------------------------------------------------------------------------
    def _prepare_bindings(self) -> None:
        ort = onnxruntime()
        self._values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.params.items()}
        self.stat_outputs = [name for s in self.manifest.bn_stats for name in (s["batch_mean"], s["batch_inv_std"])]
        self._prepare_training()
        self.evaluation = _EvalGraph(self)

    def _prepare_training(self) -> None:
        """The masked training graph, its parameters bound in place and its gradients into preallocated buffers."""
        self.training = _MaskedTrainingGraph(self)
        self.trainable, self.grads = self.training.trainable, self.training.grads

    def _bind_parameters(self, session: InferenceSession):
        """An IOBinding of `session` with every parameter input bound in place (checked first: check_parameters)."""
        check_parameters(session, self.params, self.manifest, self.dir)
        binding = session.io_binding()
        for arg in session.get_inputs():
            if arg.name in self._values:
                binding.bind_ortvalue_input(arg.name, self._values[arg.name])
        return binding

    # masks -------------------------------------------------------------------------------
    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        self.masks.update(checked_masks(self.layers, masks))
        self.param_masks = _parameter_masks(self.layers, self.masks)

    # steps -------------------------------------------------------------------------------
    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        """One optimizer step on a batch (with an update rule installed: the rule's step; `lr` unused); returns (loss, logits)."""
        outputs = self.forward_backward(images, labels)
        if self.rule is None:
            self._optimizer_step(lr)
        else:
            outputs = rule_step(self, self.rule, images, labels, outputs)
        loss, logits, statistics = self._outputs(outputs)
        for name, value in updated_running_statistics(self.manifest, statistics, len(images), self.params.__getitem__):
            np.copyto(self.params[name], value)
        return loss, logits

    def forward_backward(self, images: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
        """Loss, logits and BatchNorm statistics; the gradients land in self.grads."""
        return self.training.run(images, labels, self.masks)

    @staticmethod
    def _outputs(outputs: list[np.ndarray]) -> tuple[float, np.ndarray, list[np.ndarray]]:
        return float(outputs[0]), outputs[1], outputs[2:]

    def _optimizer_step(self, lr: float) -> None:
        self.optimizer.step({p: self.params[p] for p in self.trainable}, self.grads, lr, self.param_masks)

    def gradients(self) -> Grads:
        """The last step's gradients, each (values, rows): every row (masked channels hold 0)."""
        return {p: (self.grads[p], None) for p in self.trainable}

    def eval_batch(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outputs = self.evaluation.run(images, taps=True)
        return outputs[1], {layer.name: tap for layer, tap in zip(self.manifest.layers, outputs[2:])}

    def eval_logits(self, images: np.ndarray) -> np.ndarray:
        return self.evaluation.run(images, taps=False)[1]

    # what a step costs ---------------------------------------------------------------------
    def update_bytes(self) -> int:
        """Gradients and optimizer state held for an update: every trainable parameter (masks zero, not skip)."""
        state = sum(v.nbytes for k, v in self.optimizer.state_dict().items() if k != "step")  # AdamW's moments
        return sum(g.nbytes for g in self.grads.values()) + state

    def backward_macs(self) -> int:
        from onnx_neq.graph.specialize import full_backward_macs

        return full_backward_macs(self.dir, self.manifest, "portable_training_model")

    # parameters --------------------------------------------------------------------------
    def parameter(self, name: str) -> np.ndarray:
        return self.params[name].copy()

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: array.copy() for name, array in self.params.items()}

    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite parameters in place (their buffers stay bound); NeqError for an unknown name or another shape."""
        for name, value in values.items():
            param = self.params.get(name)
            if param is None or np.shape(value) != param.shape:
                raise NeqError(f"cannot set parameter {name!r}: {'no such parameter' if param is None else f'shape {np.shape(value)}'}")
            np.copyto(param, value)

    def save_checkpoint(self, path: str | Path) -> None:
        """Every parameter and the optimizer state, for an exact resume (the caller renames it into place)."""
        _save_npz(path, {**self.params, **{OPTIMIZER_PREFIX + k: v for k, v in self.optimizer.state_dict().items()}})

    @staticmethod
    def read_parameters(path: str | Path, names: list[str]) -> dict[str, np.ndarray]:
        return npz_parameters(path, names)

    def export_inference(self, path: str | Path) -> None:
        """Write an inference model (current weights, logits only, no masks or taps)."""
        export_inference_model(self.dir, self.manifest, self.params, path)


class _MaskedTrainingGraph:
    """portable_training_model.onnx in one InferenceSession: the backend's parameters bound in place (IOBinding),
    every gradient written into a preallocated array, masks fed per step."""

    def __init__(self, backend: PortableBackend):
        self.manifest, self.stat_outputs = backend.manifest, backend.stat_outputs
        path = artifact_model(backend.dir, backend.manifest, "portable_training_model")
        self.session = onnxruntime().InferenceSession(str(path), backend.options, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in self.session.get_outputs()]
        self.grad_names = [name for name in outputs if name.endswith("_grad")]
        self.trainable = [name[: -len("_grad")] for name in self.grad_names]
        missing = [p for p in self.trainable if p not in backend.params]
        if missing:
            raise NeqError(f"{backend.dir}: parameters {missing[:3]} of the portable training model are not in the artifacts' parameters")
        self.grads = {p: np.zeros_like(backend.params[p]) for p in self.trainable}
        self.binding = backend._bind_parameters(self.session)
        for p, g in zip(self.trainable, self.grad_names):
            buffer = self.grads[p]
            self.binding.bind_output(g, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        for name in self._other_outputs():
            self.binding.bind_output(name, "cpu")  # after the gradients: get_outputs() keeps binding order
        self.inputs = {i.name for i in self.session.get_inputs()}

    def _other_outputs(self) -> tuple[str, ...]:
        return (self.manifest.loss_output, self.manifest.logits_output, *self.stat_outputs)

    def run(self, images: np.ndarray, labels: np.ndarray, masks: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One forward and backward pass: the gradients land in `grads`; returns loss, logits and the BN statistics."""
        b = self.binding
        b.bind_cpu_input(self.manifest.input.name, f32(images))
        b.bind_cpu_input(self.manifest.label_input, np.ascontiguousarray(labels, np.int64))
        for layer in self.manifest.layers:
            if layer.mask_input in self.inputs:
                b.bind_cpu_input(layer.mask_input, masks[layer.name])
        for name in self._other_outputs():
            b.bind_output(name, "cpu")  # rebound each step: the batch size may change; the position stays
        self.session.run_with_iobinding(b)
        values = b.get_outputs()
        return [values[len(self.grads) + i].numpy() for i in range(2 + len(self.stat_outputs))]


class _EvalGraph:
    """eval_model.onnx in one InferenceSession, the backend's parameters bound in place (IOBinding)."""

    def __init__(self, backend: PortableBackend):
        self.manifest = backend.manifest
        path = artifact_model(backend.dir, backend.manifest, "eval_model")
        self.session = onnxruntime().InferenceSession(str(path), backend.options, providers=["CPUExecutionProvider"])
        self.binding = backend._bind_parameters(self.session)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray, taps: bool) -> list[np.ndarray]:
        """Loss, logits and (with `taps`) every conv's raw output."""
        b = self.binding
        b.bind_cpu_input(self.manifest.input.name, f32(images))
        b.bind_cpu_input(self.manifest.label_input, np.zeros(len(images), np.int64))
        for name in self.outputs:
            b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        values = b.get_outputs()
        return [values[i].numpy() for i in range(len(self.outputs) if taps else 2)]


def check_parameters(session: InferenceSession, params: dict[str, np.ndarray], manifest: Manifest, directory: Path) -> None:
    """Every parameter input of `session` has an array in `params` of its declared dtype and shape (parameters.npz
    and checkpoints are files someone may hand us): one NeqError before ONNX Runtime runs anything."""
    from onnx_neq.graph.specialize import CHANNELS_SUFFIX  # the specialised graphs' channel inputs, fed per selection

    fed = {manifest.input.name, manifest.label_input, *(layer.mask_input for layer in manifest.layers)}
    for arg in session.get_inputs():
        if arg.name in fed or arg.name.endswith(CHANNELS_SUFFIX):
            continue
        array = params.get(arg.name)
        problem = "is missing" if array is None else _mismatch(array, arg)
        if problem:
            raise NeqError(
                f"{directory}: parameter {arg.name!r} {problem}; the parameters do not belong to this model, re-run `onnx-neq prepare`"
            )


def _parameter_masks(layers: dict, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each conv weight and bias -> its layer's mask."""
    out = {}
    for name, layer in layers.items():
        for param in filter(None, (layer.weight, layer.bias)):
            out[param] = masks[name]
    return out


def _save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()


def npz_parameters(path: str | Path, names: list[str]) -> dict[str, np.ndarray]:
    """Parameters `names` read from a .npz checkpoint or parameters file; NeqError if one is missing."""
    stored = _load_npz(path)
    missing = [n for n in names if n not in stored]
    if missing:
        raise NeqError(f"{path} lacks parameters {missing[:3]}")
    return {n: stored[n] for n in names}


def export_inference_model(directory: Path, manifest: Manifest, params: dict[str, np.ndarray], path: str | Path) -> None:
    """Write the inference model of the artifacts' eval model with `params` (logits only, no masks or taps)."""
    import onnx

    from onnx_neq.graph.inference import inference_from_eval

    model = inference_from_eval(onnx.load(str(artifact_model(directory, manifest, "eval_model"))), params, manifest)
    onnx.save(model, str(path))


def _load_npz(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise NeqError(f"{path} does not exist") from None
    except Exception as exc:
        raise NeqError(f"{path} is not a readable parameter file ({str(exc).splitlines()[0][:100]})") from None


def _mismatch(array: np.ndarray, arg) -> str | None:
    """How `array` differs from what the graph input `arg` declares (dtype, rank, static dims), or None."""
    dtype = ORT_DTYPES.get(arg.type)
    if dtype is None or array.dtype != dtype:
        return f"has dtype {array.dtype}, the model wants {arg.type}"
    shape = arg.shape or []
    if not shape and array.size == 1:  # a scalar constant stored as [1]: onnxruntime takes it
        return None
    if array.ndim != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, array.shape)):
        return f"has shape {list(array.shape)}, the model wants {shape}"
    return None
