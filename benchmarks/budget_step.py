"""What a training step costs at a budget: PyTorch's three ways against onnx-neq's two backends.

One table from one run (docs/benchmarks/budget-step.md): ms/step, peak RSS,
backward MACs per image and trained parameters for

  torch-full      PyTorch, full fine-tuning (every parameter, no masks)
  torch-zeroed    PyTorch, the authors' method: full backward, then the unselected channels' weight
                  gradients zeroed before SGD (BatchNorm and the classifier train everywhere)
  torch-frozen    PyTorch freezing what it can with requires_grad: convs with no selected channel and
                  their BatchNorms get requires_grad=False, partly selected convs compute their full
                  weight gradient and zero the unselected rows (autograd skips the backward below
                  the first parameter that needs a gradient)
  ort-masked      onnx-neq's ort-training backend (masks multiply gradients computed in full)
  specialized     onnx-neq's specialised backend with --bn-update selected (backends/specialize.py)
  specialized-pattern  the same with --memory-pattern (ORT's planned memory block, its default)

for MobileNetV2 and ResNet-18 at 128 px, batch 8 and 32, budgets 8.8%, 21.2% and 30.8% of the conv
parameters, with three selections at each budget:

  velocity   velocity's selection (docs/ALGORITHM.md) after a short first "epoch": the taps of 16
             images before and after 3 SGD steps on random images, one velocity update, greedy fill
  velocity-compute  cost-aware velocity, as `train --cost compute --budget-ratio R` selects: the same
             velocity per backward MAC, filled to R of the full backward's MACs per image, the reach
             to the shallowest selected layer included (docs/ALGORITHM.md, "Cost models")
  su         Sparse Update's static scheme: MobileNetV2's built-in scheme that fits the budget (the
             paper's three budgets are its schemes); for ResNet-18, which has none, the same shape:
             the last layers first, channels by weight norm, to the budget

Weights are random (nothing can be downloaded here): speed and memory do not depend on them.
Backward MACs are counted from the graphs (backends/specialize.py), not measured. Each measurement
runs in its own process so peak RSS (VmHWM) is its own; all use --threads threads.

    python benchmarks/budget_step.py                 # the full table (about 15 minutes on 2 cores)
    python benchmarks/budget_step.py --selections velocity-compute --out X.json   # one selection's rows
    python benchmarks/budget_step.py --quick         # MobileNetV2, batch 8, one budget: checks the script
    python benchmarks/budget_step.py --table         # only print the table of the last run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from worker_common import add_worker_options, peak_rss_mib

HERE = Path(__file__).resolve().parent
RATIOS = (0.088, 0.212, 0.308)
SELECTIONS = ("velocity", "velocity-compute", "su")
METHODS = ("torch-full", "torch-zeroed", "torch-frozen", "ort-masked", "specialized", "specialized-pattern")


def _batch(args):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.resolution, args.resolution)).astype(np.float32)
    return x, rng.integers(0, 10, args.batch)


def _timed(step, args) -> list[float]:
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def worker_backend(args) -> dict:
    from onnx_neq.backends.base import open_backend

    specialized = args.method.startswith("specialized")
    options = {"bn_update": "selected", "memory_pattern": args.method == "specialized-pattern"} if specialized else {}
    backend = open_backend("specialized" if specialized else "ort-training", args.artifacts, threads=args.threads, **options)
    backend.set_masks(dict(np.load(args.masks)))
    x, y = _batch(args)
    times = _timed(lambda: backend.train_step(x, y, 0.01), args)
    return {"ms_per_step": 1000 * float(np.median(times)), "peak_rss_mib": peak_rss_mib()}


def worker_torch(args) -> dict:
    import torch

    from onnx_neq.architectures import build

    torch.set_num_threads(args.threads)
    model = build(args.arch, num_classes=10)  # as prepare_case built the weights
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    model.train()
    convs, bn_of = _convs_and_batchnorms(model, torch)
    masks = {n: torch.from_numpy(m).view(-1, 1, 1, 1) for n, m in np.load(args.masks).items()} if args.method != "torch-full" else {}
    if args.method == "torch-frozen":
        for name, conv in convs:
            if not masks[name].any():
                for p in [conv.weight, conv.bias, *((bn_of[name].weight, bn_of[name].bias) if name in bn_of else ())]:
                    if p is not None:
                        p.requires_grad_(False)
    partial = [(n, c, masks[n]) for n, c in convs if n in masks and c.weight.requires_grad and not masks[n].all()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x, y = (torch.from_numpy(a) for a in _batch(args))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for _, conv, mask in partial:
            conv.weight.grad.mul_(mask)
        opt.step()

    times = _timed(step, args)
    return {"ms_per_step": 1000 * float(np.median(times)), "peak_rss_mib": peak_rss_mib(), "torch": torch.__version__}


def _convs_and_batchnorms(model, torch):
    """Conv2d modules in order, and the BatchNorm2d that directly follows each in module order."""
    modules = list(model.named_modules())
    convs, bn_of = [], {}
    for i, (name, module) in enumerate(modules):
        if isinstance(module, torch.nn.Conv2d):
            convs.append((name, module))
            if i + 1 < len(modules) and isinstance(modules[i + 1][1], torch.nn.BatchNorm2d):
                bn_of[name] = modules[i + 1][1]
    return convs, bn_of


# -- the parent: artifacts, selections, counts -----------------------------------------------


def prepare_case(arch: str, resolution: int, workdir: Path) -> tuple[Path, Path]:
    import torch

    from onnx_neq.architectures import build
    from onnx_neq.export import export
    from onnx_neq.graph.prepare import prepare

    torch.manual_seed(0)
    weights = workdir / f"{arch}.pth"
    torch.save(build(arch, num_classes=10).state_dict(), weights)
    export(arch, workdir / f"{arch}.onnx", weights=weights, num_classes=10, resolution=resolution)
    prepare(workdir / f"{arch}.onnx", workdir / f"{arch}-artifacts")
    return weights, workdir / f"{arch}-artifacts"


def velocity_scores(artifacts: Path, resolution: int) -> np.ndarray:
    """Velocity after a short first "epoch": taps of 16 images before and after 3 SGD steps, one update."""
    from onnx_neq.backends.base import open_backend
    from onnx_neq.selection.velocity import VelocityState, layer_phi

    backend = open_backend("ort-training", artifacts)
    layers = backend.manifest.layers
    rng = np.random.default_rng(1)
    images = rng.standard_normal((16, 3, resolution, resolution)).astype(np.float32)
    before = backend.eval_batch(images)[1]
    for _ in range(3):
        backend.train_step(rng.standard_normal((8, 3, resolution, resolution)).astype(np.float32), rng.integers(0, 10, 8), 0.01)
    velocity = VelocityState(sum(layer.out_channels for layer in layers))
    return velocity.update(layer_phi(backend.eval_batch(images)[1], before, [layer.name for layer in layers]))


def velocity_selection(artifacts: Path, velocity: np.ndarray, ratio: float, cost: str, batch: int) -> np.ndarray:
    """Greedy |velocity| per cost to `ratio` of the cost model's total, as `train --cost COST` selects."""
    from onnx_neq.manifest import read_manifest
    from onnx_neq.selection.cost_model import cost_model, greedy_fill
    from onnx_neq.selection.selectors import velocity_ranking

    model = cost_model(cost, read_manifest(artifacts), "always" if cost == "params" else "selected", batch)
    return greedy_fill(velocity_ranking(velocity, model.per_neuron), model, int(model.total * ratio))


def su_selection(artifacts: Path, ratio: float) -> np.ndarray:
    from onnx_neq.graph.artifacts import FILES
    from onnx_neq.manifest import read_manifest
    from onnx_neq.selection.cost_model import cost_model, greedy_fill
    from onnx_neq.selection.schemes import MOBILENET_V2_CONVS, su_selection

    manifest = read_manifest(artifacts)
    params = np.load(artifacts / FILES["parameters"])
    norms = [np.linalg.norm(params[layer.weight].reshape(layer.out_channels, -1), axis=1) for layer in manifest.layers]
    budget = int(manifest.selectable_params * ratio)
    model = cost_model("params", manifest)
    if len(manifest.layers) == MOBILENET_V2_CONVS:
        return su_selection(None, manifest, norms, model, budget)
    offsets = np.cumsum([0] + [layer.out_channels for layer in manifest.layers])
    order = np.concatenate([offsets[i] + np.argsort(-norms[i], kind="stable") for i in reversed(range(len(norms)))])
    return greedy_fill(order, model, budget, backfill=True)


def counts(artifacts: Path, selected: np.ndarray, method: str) -> tuple[int, int]:
    """(backward MACs per image, trained parameters) of `method` at the selection, from the graphs."""
    import onnx

    from onnx_neq.graph.specialize import full_backward_macs, layer_states, specialize
    from onnx_neq.manifest import read_manifest
    from onnx_neq.selection.selectors import split_by_layer

    manifest = read_manifest(artifacts)
    layers = manifest.layers
    masks = dict(zip([layer.name for layer in layers], split_by_layer(selected, [layer.out_channels for layer in layers])))
    k = {layer.name: int(masks[layer.name].sum()) for layer in layers}
    conv_params = sum(k[layer.name] * layer.neuron_cost for layer in layers)
    fixed = manifest.classifier_params + manifest.other_params
    if method == "torch-full":
        return full_backward_macs(artifacts, manifest), manifest.selectable_params + fixed + manifest.bn_params
    if method in ("torch-zeroed", "ort-masked"):
        return full_backward_macs(artifacts, manifest), conv_params + fixed + manifest.bn_params
    states = layer_states(manifest, masks)
    if method == "torch-frozen":  # whole tensors: a partly selected layer's dW is computed in full
        states = {name: "all" if state == "some" else state for name, state in states.items()}
    _, report = specialize(onnx.load(str(artifacts / manifest.files["training_model"])), manifest, states, "selected")
    bn = 2 * sum(k[layer.name] for layer in layers if layer.bn)
    return report.backward_macs(k if method.startswith("specialized") else None), conv_params + fixed + bn


def run_worker(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args) -> list[dict]:
    archs = ["mobilenet_v2"] if args.quick else ["mobilenet_v2", "resnet18"]
    batches = [8] if args.quick else [8, 32]
    ratios = [0.088] if args.quick else list(RATIOS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            weights, artifacts = prepare_case(arch, args.resolution, Path(tmp))
            selections = {}  # (ratio, selection) -> (masks file, {method: (backward MACs, trained params)})
            velocity = velocity_scores(artifacts, args.resolution)
            for ratio in ratios:
                for selection in args.selections.split(","):
                    if selection == "su":
                        selected = su_selection(artifacts, ratio)
                    else:
                        selected = velocity_selection(
                            artifacts, velocity, ratio, "compute" if selection == "velocity-compute" else "params", 1
                        )
                    masks = Path(tmp) / f"{arch}-{ratio}-{selection}.npz"
                    _save_masks(artifacts, selected, masks)
                    selections[(ratio, selection)] = masks, {method: counts(artifacts, selected, method) for method in METHODS}
            for batch in batches:
                common = dict(
                    arch=arch, batch=batch, resolution=args.resolution, threads=args.threads, steps=args.steps, warmup=args.warmup
                )
                full = None
                for (ratio, selection), (masks, counted) in selections.items():
                    for method in METHODS:
                        if method == "torch-full" and full is not None:
                            result = full
                        elif method.startswith("torch"):
                            result = run_worker("torch", method=method, weights=weights, masks=masks, **common)
                        else:
                            result = run_worker("backend", method=method, artifacts=artifacts, masks=masks, **common)
                        full = result if method == "torch-full" else full
                        macs, trained = counted[method]
                        row = {"arch": arch, "batch": batch, "budget": ratio, "selection": selection, "method": method,
                               "backward_macs": macs, "trained_params": trained, **result}  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    return rows


def _save_masks(artifacts: Path, selected: np.ndarray, path: Path) -> None:
    from onnx_neq.manifest import read_manifest
    from onnx_neq.selection.selectors import split_by_layer

    layers = read_manifest(artifacts).layers
    masks = split_by_layer(selected, [layer.out_channels for layer in layers])
    np.savez(path, **{layer.name: m.astype(np.float32) for layer, m in zip(layers, masks)})


def table(rows: list[dict]) -> str:
    lines = [
        "| model | batch | budget | selection | method | ms/step | vs authors | peak RSS (MiB) | vs authors | backward MMACs/image | trained params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_case = {}
    for r in rows:
        by_case.setdefault((r["arch"], r["batch"], r["budget"], r["selection"]), {})[r["method"]] = r
    for (arch, batch, budget, selection), methods in by_case.items():
        authors = methods.get("torch-zeroed")
        for method, r in methods.items():
            speed = f"{r['ms_per_step'] / authors['ms_per_step']:.2f}x" if authors else ""
            memory = f"{r['peak_rss_mib'] / authors['peak_rss_mib']:.2f}x" if authors else ""
            lines.append(
                f"| {arch} | {batch} | {budget:.1%} | {selection} | {method} | {r['ms_per_step']:.0f} | {speed} | "
                f"{r['peak_rss_mib']:.0f} | {memory} | {r['backward_macs'] / 1e6:.0f} | {r['trained_params']:,} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_worker_options(parser, steps=8, warmup=2)
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--selections", default=",".join(SELECTIONS), help=f"Comma-separated, of {', '.join(SELECTIONS)}.")
    parser.add_argument("--table", action="store_true", help="Only print the table of the last run (--out).")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "budget_step.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((worker_torch if args.worker == "torch" else worker_backend)(args)))
        return
    if not args.table:
        rows = measure(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print(table(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
