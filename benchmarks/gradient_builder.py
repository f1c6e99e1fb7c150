"""onnx-neq's gradient builder against the old path (ORT 1.19.2's builder + the lowering): prepare time
and training step time of the two portable graphs, measured in one process, interleaved.

    python benchmarks/gradient_builder.py [--models shipped,resnet18,mobilenet_v2] [--batch 32] [--rounds 7]

Needs the reference environment (onnxruntime-training, for the old path) and torch (to export the
ResNet-18 / MobileNetV2 twins, random weights, BatchNorm in training mode, 32 px). For each model:
  prepare   seconds to write the portable artifacts: new = onnx-neq's builder (training graph, eval
            graph, parameters), old = ORT's generate_artifacts + mask/statistics passes + lowering +
            checkpoint -> npz (what prepare did before); median of --rounds, alternating
  step      ms per training step (loss, logits, every gradient; all masks 1) of each portable graph in
            an onnxruntime InferenceSession, batch --batch, both sessions alive, alternating rounds
            of 10 steps; the ratio new/old per round, its median and range
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_neq.graph import artifacts  # noqa: E402
from onnx_neq.graph.gradients import build_eval_model, build_training_model  # noqa: E402
from onnx_neq.graph.lowering import lower_training_model  # noqa: E402
from onnx_neq.ort_runtime import inference_session, session_options  # noqa: E402


def _captured_inputs(model_path: Path, work: Path) -> dict:
    """The arguments prepare passes to artifacts.generate for `model_path`."""
    from onnx_neq.graph.prepare import prepare

    captured = {}
    original = artifacts.generate

    def spy(model, groups, layers, optimizer, directory, logits, weight_decay=0.0, bn_positions=None, ort_training=None):
        captured.update(model=model, groups=groups, layers=layers, logits=logits, bn_positions=bn_positions)
        return original(model, groups, layers, optimizer, directory, logits, weight_decay, bn_positions, ort_training)

    artifacts.generate = spy
    try:
        prepare(model_path, work / "art")
    finally:
        artifacts.generate = original
    return captured


def _new(c: dict, out: Path) -> Path:
    training, _ = build_training_model(
        c["model"], c["groups"].trainable, c["groups"].frozen, c["layers"], c["logits"], "labels", c["bn_positions"]
    )
    onnx.save(training, str(out / "new.onnx"))
    onnx.save(build_eval_model(c["model"], c["groups"].trainable + c["groups"].frozen, c["logits"], "labels"), str(out / "eval.onnx"))
    artifacts._write_parameters(c["model"], c["groups"].trainable + c["groups"].frozen, out / "p.npz")
    return out / "new.onnx"


def _old(c: dict, out: Path) -> Path:
    from onnx_neq.graph.passes.batchnorm_statistics import BatchNormStatisticsPass
    from onnx_neq.graph.passes.gradient_masks import GradientMaskPass
    from onnx_neq.ort_runtime import captured_native_stderr, training_api

    ort_dir = out / "ort"
    artifacts._generate_ort_artifacts(c["model"], c["groups"], artifacts._optimizer_block("sgd", 0.0), ort_dir, c["logits"])
    user = [v.name for v in c["model"].graph.input if v.name not in {i.name for i in c["model"].graph.initializer}]
    passes = [GradientMaskPass(c["layers"], [*user, "labels"]), BatchNormStatisticsPass(c["bn_positions"] or {})]
    _, reports = artifacts._rewrite(ort_dir / "training_model.onnx", passes)
    keep = [n for s in reports[BatchNormStatisticsPass].stats for n in (s["batch_mean"], s["batch_inv_std"])]
    lowered, _ = lower_training_model(onnx.load(str(ort_dir / "training_model.onnx")), keep_outputs=keep)
    onnx.save(lowered, str(out / "old.onnx"))
    with captured_native_stderr():
        state = training_api().CheckpointState.load_checkpoint(str(ort_dir / "checkpoint"))
        np.savez(out / "p_old.npz", **{name: np.array(p.data) for name, p in state.parameters})
    return out / "old.onnx"


def _feeds(path: Path, params: dict, batch: int, rng) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in params:
            feeds[vi.name] = params[vi.name]
            continue
        dims = [d.dim_value or batch for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[vi.name] = rng.integers(0, 2, dims).astype(np.int64)
        elif vi.name.endswith(".neq_mask"):
            feeds[vi.name] = np.ones(dims, np.float32)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def measure(name: str, model_path: Path, batch: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        c = _captured_inputs(model_path, work)
        times = {"new": [], "old": []}
        for r in range(rounds):
            for kind in ("new", "old") if r % 2 == 0 else ("old", "new"):
                out = work / f"{kind}{r}"
                out.mkdir()
                start = time.perf_counter()
                (_new if kind == "new" else _old)(c, out)
                times[kind].append(time.perf_counter() - start)
        params = dict(np.load(work / "new0" / "p.npz"))
        sessions = {}
        for kind in ("new", "old"):
            path = work / f"{kind}0" / f"{kind}.onnx"
            sessions[kind] = (inference_session(path, threads=0), _feeds(path, params, batch, rng))
        step = {"new": [], "old": []}
        for kind in ("new", "old"):  # warm-up
            sessions[kind][0].run(None, sessions[kind][1])
        for r in range(rounds):
            for kind in ("new", "old") if r % 2 == 0 else ("old", "new"):
                session, feeds = sessions[kind]
                start = time.perf_counter()
                for _ in range(10):
                    session.run(None, feeds)
                step[kind].append((time.perf_counter() - start) / 10 * 1000)
        nodes = {k: len(onnx.load(str(work / f"{k}0" / f"{k}.onnx"), load_external_data=False).graph.node) for k in ("new", "old")}
    ratios = [n / o for n, o in zip(step["new"], step["old"])]
    return {
        "model": name,
        "prepare_new": statistics.median(times["new"]),
        "prepare_old": statistics.median(times["old"]),
        "step_new": statistics.median(step["new"]),
        "step_old": statistics.median(step["old"]),
        "ratio": statistics.median(ratios),
        "ratio_lo": min(ratios),
        "ratio_hi": max(ratios),
        "nodes_new": nodes["new"],
        "nodes_old": nodes["old"],
    }


def _model(name: str, work: Path) -> Path:
    if name == "shipped":
        return ROOT / "onnx_neq" / "models" / "mobilenet_v2_035_fmnist04.onnx"
    from onnx_neq.export import export

    path = work / f"{name}.onnx"
    export(name, path, num_classes=10, resolution=32)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shipped,resnet18,mobilenet_v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    session_options(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(measure(name, _model(name, Path(tmp)), args.batch, args.rounds))
            print(f"{name}: done", file=sys.stderr)
    print(f"batch {args.batch}, {args.rounds} rounds (prepare: median; step: median ms of 10-step rounds, ratio new/old per round)\n")
    print(
        "| model | prepare new (s) | prepare old (s) | step new (ms) | step old (ms) | step new/old: median [min, max] | nodes new / old |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['prepare_new']:.2f} | {r['prepare_old']:.2f} | {r['step_new']:.1f} | {r['step_old']:.1f} | "
            f"{r['ratio']:.3f} [{r['ratio_lo']:.3f}, {r['ratio_hi']:.3f}] | {r['nodes_new']} / {r['nodes_old']} |"
        )


if __name__ == "__main__":
    main()
