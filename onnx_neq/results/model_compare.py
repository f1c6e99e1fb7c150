"""Inference models side by side, as onnxsim prints them: conv layers, nodes, non-zero parameters, file size
and latency in onnxruntime (median of many single-image runs, the models interleaved in one process, so
that machine noise falls on all of them alike).

onnxruntime's dense kernels do not skip zeros: a sparse model runs as fast as the dense one unless its
layers are removed; `sparse_macs` is what a kernel that skipped zero weights would compute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_neq.ort_runtime import onnxruntime, session_options


@dataclass
class ModelFacts:
    name: str
    conv_layers: int
    nodes: int
    nonzero: int
    params: int
    file_bytes: int
    macs: int  # conv and Gemm multiply-accumulates per image, every weight
    nonzero_macs: int  # the same over the non-zero weights only: what a kernel that skips zeros would compute
    latency_ms: float = float("nan")


def model_facts(name: str, path: Path) -> ModelFacts:
    model = onnx.load(str(path))
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    nonzero, total = sum(int(np.count_nonzero(a)) for a in arrays), sum(a.size for a in arrays)
    macs, nonzero_macs = _macs(model)
    return ModelFacts(name, convs, len(model.graph.node), nonzero, total, path.stat().st_size, macs, nonzero_macs)


def _macs(model: onnx.ModelProto) -> tuple[int, int]:
    """(MACs, MACs of the non-zero weights) per image of the Conv and Gemm nodes: each weight is used once per output
    position (a Conv's output H x W, a Gemm's once); outputs without a static shape count one position."""
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*inferred.graph.value_info, *inferred.graph.output)}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    macs = nonzero = 0
    for node in model.graph.node:
        w = weights.get(node.input[1]) if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 else None
        if w is None:
            continue
        out = dims.get(node.output[0], [])
        positions = int(np.prod([d for d in out[2:] if d > 0])) if node.op_type == "Conv" else 1
        macs += w.size * positions
        nonzero += int(np.count_nonzero(w)) * positions
    return macs, nonzero


def compare_models(models: dict[str, Path], repeats: int = 200, threads: int = 1) -> list[ModelFacts]:
    """Facts of each model and its median latency on one image, the models run in turn `repeats` times."""
    facts = [model_facts(name, path) for name, path in models.items()]
    sessions = [
        onnxruntime().InferenceSession(str(p), session_options(threads), providers=["CPUExecutionProvider"]) for p in models.values()
    ]
    feeds = [_feed(s) for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for s, f in zip(sessions, feeds):  # warm-up
        s.run(None, f)
    for _ in range(repeats):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - start)
    for fact, t in zip(facts, times):
        fact.latency_ms = 1000 * float(np.median(t))
    return facts


def _feed(session) -> dict[str, np.ndarray]:
    arg = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in arg.shape]
    return {arg.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
