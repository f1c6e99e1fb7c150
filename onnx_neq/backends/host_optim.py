"""Host (numpy) optimizers that reproduce ORT's training optimizer kernels bit for bit.

The portable backend runs on stock onnxruntime (no training kernels): a standard-ONNX graph
computes the gradients and the update below is applied on the host, in float32, one rounding
per operation in the same order as ORT's CPU kernels.

SGD, `com.microsoft.SGDOptimizerV2`
(orttraining/orttraining/training_ops/cpu/optimizer/sgd/sgd.cc)::

    w = w + (-lr * g)

AdamW, `com.microsoft.AdamWOptimizer`
(orttraining/orttraining/training_ops/cpu/optimizer/adamw/adamw.cc; attribute defaults in
orttraining/orttraining/core/graph/training_op_defs.cc). prepare builds it with onnxblock
`optim.AdamW(weight_decay=wd)` (orttraining/.../onnxblock/optim/optim.py), which writes
alpha=0.9, beta=0.999, epsilon=1e-6 (float32 attributes), correct_bias=1 and adam_mode=1
(Hugging Face AdamW). ORT's Optimizer::Step (training_api/optimizer.cc) feeds `step + 1` and
counts the step once the node reports an update, so with t = completed steps + 1::

    ca = 1 - float32(pow(double(alpha), t))     cb = 1 - float32(pow(double(beta), t))
    (ca = cb = 1 when correct_bias == 0)
    m  = alpha * m + (1 - alpha) * g
    v  = beta * v + ((1 - beta) * g) * g
    adam_mode 1:  lr_c = lr * (sqrt(cb) / ca)
                  w = w - (lr_c * m) / (sqrt(v) + eps)
                  w = w - (lr * wd) * w
    adam_mode 0:  w = w - (w * lr) * wd
                  w = w - (lr * m) / (ca * (sqrt(v / cb) + eps))

`lr` is the float32 rounding of the Python float given to `set_learning_rate` (ORT stores a
C++ float). The kernel evaluates these with Eigen, which ORT builds with EIGEN_FAST_MATH: the
vectorised element-wise sqrt is rsqrt-estimate + one Newton step (up to ~3 ulp from the
correctly rounded value, and CPU-vendor dependent), exact only for the scalar tail of each
tensor. Every other operation is one IEEE float32 op. `OrtSqrt` (the default) therefore takes
the square roots with stock onnxruntime's own Sqrt kernel, which runs the same Eigen code, and
the host update is then bit-identical to ORT's; `numpy_sqrt` is correctly rounded and agrees to
a few ulp per step (~3e-7 relative in the update).

Masks (one vector per masked parameter, one entry per output channel = axis 0; 1 = train,
0 = freeze): rows with mask 0 are never written, so frozen weights stay bit-identical. For
AdamW their moments still advance with a zero gradient (they decay), as in the ORT backend,
where the training graph zeroes the masked gradients, the kernel updates every row and
session.py writes the frozen weights back. Parameters without a mask are fully trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.manifest import Manifest

Arrays = Mapping[str, np.ndarray]
SqrtFn = Callable[[Sequence[np.ndarray]], list[np.ndarray]]  # must return new, writable arrays
F32 = np.float32
STEP_KEY = "step"
MOMENT_PREFIXES = ("momentum0/", "momentum1/")  # ORT's state names for AdamW's m and v


def numpy_sqrt(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Correctly rounded float32 square roots."""
    return [np.sqrt(a) for a in arrays]


class OrtSqrt:
    """Square roots by onnxruntime's Sqrt kernel: one single-threaded run of N Sqrt nodes.

    Single-threaded so that no tensor is split into chunks (a chunk boundary would move
    Eigen's packet/scalar split); each output is allocated by ORT, aligned as ORT's
    parameter buffers are, so every element takes the same path as in AdamWOptimizer.
    """

    def __init__(self) -> None:
        self._sessions: dict[int, object] = {}

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not arrays:
            return []
        flat = {f"x{i}": np.ascontiguousarray(a, F32).reshape(-1) for i, a in enumerate(arrays)}
        roots = self._session(len(arrays)).run(None, flat)
        return [r.reshape(a.shape) for r, a in zip(roots, arrays)]

    def _session(self, n: int):
        if n not in self._sessions:
            self._sessions[n] = _sqrt_session(n)
        return self._sessions[n]


def _sqrt_session(n: int):
    from onnx import TensorProto, helper

    from onnx_neq.ort_runtime import onnxruntime

    ort = onnxruntime()
    nodes = [helper.make_node("Sqrt", [f"x{i}"], [f"y{i}"]) for i in range(n)]
    io = [[helper.make_tensor_value_info(f"{c}{i}", TensorProto.FLOAT, ["n"]) for i in range(n)] for c in "xy"]
    model = helper.make_model(helper.make_graph(nodes, "sqrt", io[0], io[1]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class HostOptimizer:
    """Common interface: `step` updates `params` in place (their buffers are never rebound)."""

    kind = ""

    def __init__(self) -> None:
        self.step_count = 0  # completed steps, as ORT's optimizer state `step`

    def step(self, params: Arrays, grads: Arrays, lr: float, masks: Arrays | None = None) -> None:
        """One update of every parameter in `params` with `grads[name]` at learning rate `lr`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        return {STEP_KEY: np.array(self.step_count, np.int64)}

    def load_state_dict(self, state: Arrays) -> None:
        self.step_count = int(np.asarray(state[STEP_KEY]))


class HostSGD(HostOptimizer):
    """ORT's SGDOptimizerV2: w = w + (-lr * g); no momentum, no weight decay, no state but the count."""

    kind = "sgd"

    def step(self, params: Arrays, grads: Arrays, lr: float, masks: Arrays | None = None) -> None:
        lr32 = F32(lr)
        for name, param in params.items():
            keep = _keep_rows(name, param, grads, masks)
            delta = np.multiply(-lr32, grads[name])  # sgd.cc: delta = -lr * gradient
            if keep is None:
                np.add(param, delta, out=param)
            else:
                np.copyto(param, np.add(param, delta), where=keep)
        self.step_count += 1


class HostAdamW(HostOptimizer):
    """ORT's AdamWOptimizer (adam_mode 1 by default, as onnxblock builds it)."""

    kind = "adamw"

    def __init__(
        self,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        correct_bias: bool = True,
        adam_mode: int = 1,
        sqrt: SqrtFn | None = None,
    ) -> None:
        super().__init__()
        if adam_mode not in (0, 1):
            raise NeqError(f"AdamW adam_mode must be 0 or 1, not {adam_mode}")
        if adam_mode == 0 and not correct_bias:
            raise NeqError("AdamW adam_mode 0 needs correct_bias (as ORT's AdamWOptimizerBase enforces)")
        self.alpha, self.beta = F32(betas[0]), F32(betas[1])
        self.eps, self.weight_decay = F32(eps), F32(weight_decay)
        self.correct_bias, self.adam_mode = bool(correct_bias), adam_mode
        self.sqrt: SqrtFn = sqrt or OrtSqrt()
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def corrections(self, t: int) -> tuple[np.float32, np.float32]:
        """(ca, cb) as adamw.cc: 1.f - static_cast<float>(std::pow(alpha_, step)), pow in double."""
        if not self.correct_bias:
            return F32(1), F32(1)
        return F32(1) - F32(math.pow(float(self.alpha), t)), F32(1) - F32(math.pow(float(self.beta), t))

    def step(self, params: Arrays, grads: Arrays, lr: float, masks: Arrays | None = None) -> None:
        lr32 = F32(lr)
        ca, cb = self.corrections(self.step_count + 1)
        keeps = {name: _keep_rows(name, p, grads, masks) for name, p in params.items()}
        for name, param in params.items():
            self._advance_moments(name, param, grads[name], keeps[name])
        radicands = [self.v[n] if self.adam_mode == 1 else np.divide(self.v[n], cb) for n in params]
        for (name, param), root in zip(params.items(), self.sqrt(radicands)):
            keep = keeps[name]
            w = param if keep is None else param.copy()
            if self.adam_mode == 1:
                self._mode1(w, self.m[name], root, lr32, lr32 * (np.sqrt(cb) / ca))
            else:
                self._mode0(w, self.m[name], root, lr32, ca)
            if keep is not None:
                np.copyto(param, w, where=keep)  # frozen rows are never written
        self.step_count += 1

    def _advance_moments(self, name: str, param: np.ndarray, grad: np.ndarray, keep: np.ndarray | None) -> None:
        """m = alpha * m + (1 - alpha) * g;  v = beta * v + ((1 - beta) * g) * g (frozen rows: g = 0)."""
        if name not in self.m:
            self.m[name], self.v[name] = np.zeros_like(param), np.zeros_like(param)
        if keep is not None:
            grad = np.where(keep, grad, F32(0))
        m, v, one = self.m[name], self.v[name], F32(1)
        m *= self.alpha
        m += np.multiply(one - self.alpha, grad)
        v *= self.beta
        scaled = np.multiply(one - self.beta, grad)
        scaled *= grad
        v += scaled

    def _mode1(self, w: np.ndarray, m: np.ndarray, sqrt_v: np.ndarray, lr: np.float32, lr_c: np.float32) -> None:
        """AdamWComputeMode1 (Hugging Face): bias correction folded into lr, decay after the update."""
        step = np.multiply(lr_c, m)
        step /= np.add(sqrt_v, self.eps, out=sqrt_v)  # sqrt_v is a scratch array
        w -= step
        w -= np.multiply(lr * self.weight_decay, w, out=step)

    def _mode0(self, w: np.ndarray, m: np.ndarray, sqrt_vc: np.ndarray, lr: np.float32, ca: np.float32) -> None:
        """AdamWComputeMode0 (PyTorch): decay before the update, bias correction on m and v."""
        np.subtract(w, np.multiply(np.multiply(w, lr), self.weight_decay), out=w)
        np.subtract(w, np.divide(np.multiply(lr, m), np.multiply(ca, np.add(sqrt_vc, self.eps))), out=w)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = super().state_dict()
        for prefix, moments in zip(MOMENT_PREFIXES, (self.m, self.v)):
            state.update({prefix + name: array.copy() for name, array in moments.items()})
        return state

    def load_state_dict(self, state: Arrays) -> None:
        super().load_state_dict(state)
        for prefix, moments in zip(MOMENT_PREFIXES, (self.m, self.v)):
            moments.clear()
            moments.update({k[len(prefix) :]: np.array(a, F32) for k, a in state.items() if k.startswith(prefix)})


def make_optimizer(kind: str, weight_decay: float = 0.0, sqrt: str = "ort", **adamw) -> HostOptimizer:
    """The host optimizer for a manifest's `optimizer` ("sgd" | "adamw") and `weight_decay`.

    sqrt: "ort" (bit-identical to ORT's AdamW kernel) or "numpy" (correctly rounded, no ORT
    session). Extra AdamW keywords: betas, eps, correct_bias, adam_mode (defaults = onnxblock's).
    """
    if kind == "sgd":
        if weight_decay:
            raise NeqError("ORT's SGD has no weight decay; use --optimizer adamw for --weight-decay")
        return HostSGD()
    if kind == "adamw":
        return HostAdamW(weight_decay, sqrt=_sqrt_fn(sqrt), **adamw)
    raise NeqError(f"optimizer must be 'sgd' or 'adamw', not {kind!r}")


def optimizer_for_manifest(manifest: Manifest, sqrt: str = "ort") -> HostOptimizer:
    """make_optimizer from a Manifest's `optimizer` and `weight_decay` fields."""
    return make_optimizer(manifest.optimizer, manifest.weight_decay or 0.0, sqrt)


def optimizer_from_model(path: str | Path, sqrt: str = "ort") -> HostOptimizer:
    """The host optimizer an ORT optimizer_model.onnx describes, with its exact node attributes."""
    import onnx

    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type in ("SGDOptimizerV2", "AdamWOptimizer")]
    if len(nodes) != 1:
        raise NeqError(f"{path} has no single SGDOptimizerV2/AdamWOptimizer node")
    if nodes[0].op_type == "SGDOptimizerV2":
        return HostSGD()
    a = {attr.name: onnx.helper.get_attribute_value(attr) for attr in nodes[0].attribute}
    betas = (a.get("alpha", 0.9), a.get("beta", 0.999))  # schema defaults for absent attributes
    return HostAdamW(
        a.get("weight_decay", 1e-2),
        betas,
        a.get("epsilon", 1e-8),
        bool(a.get("correct_bias", 1)),
        int(a.get("adam_mode", 0)),
        _sqrt_fn(sqrt),
    )


def _sqrt_fn(sqrt: str) -> SqrtFn:
    if sqrt not in ("ort", "numpy"):
        raise NeqError(f"sqrt must be 'ort' or 'numpy', not {sqrt!r}")
    return OrtSqrt() if sqrt == "ort" else numpy_sqrt


def _keep_rows(name: str, param: np.ndarray, grads: Arrays, masks: Arrays | None) -> np.ndarray | None:
    """Check param/grad; a boolean array broadcastable to `param` (True = train the row), or None."""
    grad = grads[name]
    if param.dtype != F32 or grad.dtype != F32:
        raise NeqError(f"{name}: host optimizers update float32 tensors, got {param.dtype} / {grad.dtype}")
    if param.shape != grad.shape:
        raise NeqError(f"{name}: parameter shape {param.shape} but gradient shape {grad.shape}")
    if not masks or name not in masks:
        return None
    mask = np.asarray(masks[name]).reshape(-1)
    if mask.shape != (param.shape[0],):
        raise NeqError(f"{name}: mask has {mask.size} entries, the parameter has {param.shape[0]} output channels")
    return (mask != 0).reshape((-1,) + (1,) * (param.ndim - 1))
