"""Helpers of the pass tests: tiny graphs from ONNX text, run in onnxruntime as the independent reference.

A plain module (not a conftest.py: a second conftest would shadow tests/conftest.py for the tests that import
from it); the tests in this folder import it by name, as pytest puts the folder on sys.path.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def from_text(text: str, names: dict[str, str] | None = None) -> ir.Model:
    """An ir.Model from ONNX text (opset 17, IR 8); `names` renames values afterwards (the text format has no dots)."""
    model = ir.from_onnx_text(HEADER + text)
    values = {v.name: v for node in model.graph for v in [*node.inputs, *node.outputs] if v is not None}
    values.update({v.name: v for v in model.graph.inputs})
    values.update(model.graph.initializers)
    for old, new in (names or {}).items():
        values[old].name = new
    return model


def run_ort(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs onnxruntime computes for a model (which onnx's full checker must accept first)."""
    from onnx_neq.ort_runtime import inference_session

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto, full_check=True)
    return inference_session(proto).run(None, feeds)


def snapshot(model: ir.Model) -> bytes:
    """A model's serialized bytes: equal snapshots, equal models (names, order, attributes, tensors)."""
    return ir.serde.serialize_model(model).SerializeToString(deterministic=True)


def floats(n: int, seed: int) -> str:
    """n standard-normal numbers (seeded) as ONNX text."""
    return ", ".join(f"{v:.4f}" for v in np.random.default_rng(seed).standard_normal(n))


def batchnorm_feeds(rng) -> dict[str, np.ndarray]:
    """Inputs of a BatchNormalization x, s(cale), b(ias), m(ean), v(ariance) over 3 channels."""
    return {
        "x": rng.standard_normal((2, 3, 2, 2)).astype(np.float32),
        "s": rng.standard_normal(3).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
        "m": rng.standard_normal(3).astype(np.float32),
        "v": rng.uniform(0.5, 2, 3).astype(np.float32),
    }


def batchnorm_reference(x, s, b, m, v, eps=1e-3):
    """Inference-mode BatchNormalization by its formula, in numpy."""
    shape = (1, -1, 1, 1)
    return (x - m.reshape(shape)) / np.sqrt(v.reshape(shape) + eps) * s.reshape(shape) + b.reshape(shape)
