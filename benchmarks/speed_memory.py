"""Speed and memory of onnx-neq's two backends against a plain PyTorch loop, side by side.

Same model, weights, batch, resolution and masks; the PyTorch loop is the authors' method (zero the
masked channels' gradients, then SGD). onnx-neq runs through `open_backend`: "ort-training"
(onnxruntime-training 1.19.2, in this environment) and "portable" (the lowered standard-ONNX
training graph in a plain InferenceSession, the update on the host), which runs on the newest
stock onnxruntime in a second environment: the two packages install the same module and must
never share one. Each measurement runs in its own process so peak resident memory (VmHWM) is that
framework's alone. All use the same number of threads.

    python -m venv /tmp/venv-stock
    /tmp/venv-stock/bin/pip install onnxruntime numpy click onnx==1.17.0 onnx-ir==1.1.0
    /tmp/venv-stock/bin/pip install --no-deps -e .
    python benchmarks/speed_memory.py --stock-python /tmp/venv-stock/bin/python   # MobileNetV2 and ResNet-18 at 128 px, batch 8 and 32
    python benchmarks/speed_memory.py --quick --stock-python /tmp/venv-stock/bin/python   # one small case, to check the script

Without --stock-python (or $ONNX_NEQ_STOCK_PYTHON) the portable column is skipped. Artifacts are
prepared once here (prepare needs onnxruntime-training) and read by every worker.

With --repeats N every worker of a case runs N times, round robin, and its fastest run is kept (all
medians are saved): on a shared machine this keeps other load from favouring one column.

Reported per case: ms per training step (median; for portable this includes the host optimizer
step), peak RSS, the velocity + selection time of one epoch (taps of the 10-image velocity set,
phi, velocity, greedy selection) as a share of an epoch of --epoch-images training images, the
ratio portable / ORT and ORT / PyTorch, and the onnxruntime version each worker ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from worker_common import add_worker_options, peak_rss_mib

HERE = Path(__file__).resolve().parent


def _select(taps, taps_prev, names, costs, budget, state):
    from onnx_neq.selection.cost_model import greedy_fill, params_model
    from onnx_neq.selection.selectors import velocity_ranking
    from onnx_neq.selection.velocity import layer_phi

    phi = layer_phi(taps, taps_prev, names)
    velocity = state.update(phi)
    return greedy_fill(velocity_ranking(velocity, costs), params_model(costs), budget)


def worker_backend(args) -> dict:
    from onnx_neq.backends.base import open_backend
    from onnx_neq.ort_runtime import onnxruntime
    from onnx_neq.selection.velocity import VelocityState

    session = open_backend(args.backend, args.artifacts, threads=args.threads)
    names = [layer.name for layer in session.manifest.layers]
    costs = np.concatenate([np.full(layer.out_channels, layer.neuron_cost) for layer in session.manifest.layers])
    masks = dict(np.load(args.masks))
    session.set_masks(masks)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.resolution, args.resolution)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        session.train_step(x, y, 0.01)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    vset = rng.standard_normal((10, 3, args.resolution, args.resolution)).astype(np.float32)
    prev = session.eval_batch(vset)[1]
    state = VelocityState(len(costs))
    start = time.perf_counter()
    taps = session.eval_batch(vset)[1]
    _select(taps, prev, names, costs, int(costs.sum() * 0.308), state)
    selection = time.perf_counter() - start
    return {
        "backend": args.backend,
        "onnxruntime": onnxruntime().__version__,
        "python": sys.version.split()[0],
        "ms_per_step": 1000 * float(np.median(times)),
        "selection_s": selection,
        "peak_rss_mib": peak_rss_mib(),
    }


def worker_torch(args) -> dict:
    import torch

    from onnx_neq.architectures import build
    from onnx_neq.selection.velocity import VelocityState

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build(args.arch, num_classes=10, width_mult=1.0)
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    model.train()
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    names = [n for n, _ in convs]
    masks = dict(np.load(args.masks))
    mask_tensors = {n: torch.from_numpy(masks[n]).view(-1, 1, 1, 1) for n in names}
    costs = np.concatenate([np.full(m.out_channels, m.weight[0].numel()) for _, m in convs])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.batch, 3, args.resolution, args.resolution)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, args.batch))
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for n, m in convs:
            m.weight.grad.mul_(mask_tensors[n])
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    vset = torch.from_numpy(rng.standard_normal((10, 3, args.resolution, args.resolution)).astype(np.float32))

    def taps() -> dict[str, np.ndarray]:
        out = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: out.__setitem__(n, o.detach().numpy())) for n, m in convs]
        model.eval()
        with torch.no_grad():
            model(vset)
        model.train()
        for h in hooks:
            h.remove()
        return out

    prev = taps()
    state = VelocityState(len(costs))
    start = time.perf_counter()
    _select(taps(), prev, names, costs, int(costs.sum() * 0.308), state)
    selection = time.perf_counter() - start
    return {
        "torch": torch.__version__,
        "ms_per_step": 1000 * float(np.median(times)),
        "selection_s": selection,
        "peak_rss_mib": peak_rss_mib(),
    }


def prepare_case(arch: str, resolution: int, workdir: Path) -> tuple[Path, Path, Path]:
    """Export (shared weights), prepare artifacts, and draw random masks at 30.8% of the budget."""
    import torch

    from onnx_neq.architectures import build
    from onnx_neq.export import export
    from onnx_neq.graph.prepare import prepare
    from onnx_neq.manifest import read_manifest
    from onnx_neq.selection.cost_model import greedy_fill, params_model
    from onnx_neq.selection.selectors import split_by_layer

    torch.manual_seed(0)
    weights = workdir / f"{arch}.pth"
    torch.save(build(arch, num_classes=10).state_dict(), weights)
    export(arch, workdir / f"{arch}.onnx", weights=weights, num_classes=10, resolution=resolution)
    artifacts = workdir / f"{arch}-artifacts"
    prepare(workdir / f"{arch}.onnx", artifacts)
    manifest = read_manifest(artifacts)
    costs = np.concatenate([np.full(l.out_channels, l.neuron_cost) for l in manifest.layers])
    order = np.random.default_rng(0).permutation(len(costs))
    selected = greedy_fill(order, params_model(costs), int(manifest.selectable_params * 0.308))
    masks = dict(zip([l.name for l in manifest.layers], split_by_layer(selected, [l.out_channels for l in manifest.layers])))
    np.savez(workdir / f"{arch}-masks.npz", **masks)
    return weights, artifacts, workdir / f"{arch}-masks.npz"


STOCK_PYTHON_ENV = "ONNX_NEQ_STOCK_PYTHON"


def run_worker(kind: str, python: str | None = None, **kw) -> dict:
    cmd = [python or sys.executable, __file__, "--worker", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker ({' '.join(cmd[:1] + cmd[3:])}) failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def stock_environment(python: str) -> dict:
    """The stock onnxruntime that `python` imports; refuses an environment with onnxruntime-training."""
    probe = (
        "import json, onnx_neq; from onnx_neq.ort_runtime import onnxruntime; "
        "from onnx_neq.backends.base import training_kernels_available; "
        "print(json.dumps({'onnxruntime': onnxruntime().__version__, 'training': training_kernels_available(), "
        "'onnx_neq': onnx_neq.__file__}))"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"--stock-python {python} cannot import onnx_neq and onnxruntime:\n{result.stderr[-1500:]}")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    if info["training"]:
        raise SystemExit(f"--stock-python {python} has onnxruntime-training {info['onnxruntime']}, not stock onnxruntime")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_worker_options(parser, steps=15, warmup=3)
    parser.add_argument("--backend", choices=["ort-training", "portable"], help="(worker) which onnx-neq backend to measure")
    parser.add_argument("--epoch-images", type=int, default=1000)
    parser.add_argument(
        "--stock-python",
        default=os.environ.get(STOCK_PYTHON_ENV),
        help=f"Python of a virtualenv with stock onnxruntime (not -training) and onnx-neq, for the portable column "
        f"(default ${STOCK_PYTHON_ENV}; without either the portable column is skipped).",
    )
    parser.add_argument("--repeats", type=int, default=1, help="Run every worker this many times (round robin) and keep its fastest run.")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--table", type=Path, help="Only print the table of an earlier run's JSON.")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "speed_memory.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((worker_backend if args.worker == "backend" else worker_torch)(args)))
        return
    if args.table:
        saved = json.loads(args.table.read_text())
        print(markdown(saved["rows"], saved["epoch_images"], saved["threads"]))
        return
    from onnx_neq.ort_runtime import onnxruntime

    versions = {"ort-training": onnxruntime().__version__}
    if args.stock_python:
        stock = stock_environment(args.stock_python)
        versions["portable"] = stock["onnxruntime"]
        print(f"portable backend: {args.stock_python} (stock onnxruntime {stock['onnxruntime']})", flush=True)
    else:
        print(
            f"portable column skipped: no --stock-python and no ${STOCK_PYTHON_ENV} (a virtualenv with stock onnxruntime, "
            "see this script's docstring)",
            file=sys.stderr,
            flush=True,
        )
    cases = [("mobilenet_v2", 64, 8)] if args.quick else [(a, 128, b) for a in ("mobilenet_v2", "resnet18") for b in (8, 32)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = {}
        for arch, resolution, batch in cases:
            if (arch, resolution) not in prepared:
                prepared[(arch, resolution)] = prepare_case(arch, resolution, Path(tmp))
            weights, artifacts, masks = prepared[(arch, resolution)]
            common = dict(
                arch=arch, batch=batch, resolution=resolution, steps=args.steps, warmup=args.warmup, threads=args.threads, masks=masks
            )
            workers = {"ort_training": ("backend", None, dict(backend="ort-training", artifacts=artifacts))}
            if args.stock_python:
                workers["portable"] = ("backend", args.stock_python, dict(backend="portable", artifacts=artifacts))
            workers["pytorch"] = ("torch", None, dict(weights=weights))
            runs = {key: [] for key in workers}
            for _ in range(args.repeats):  # round robin, so load from elsewhere hits every column alike
                for key, (kind, python, extra) in workers.items():
                    runs[key].append(run_worker(kind, python=python, **extra, **common))
            row = {"arch": arch, "resolution": resolution, "batch": batch}
            for key, results in runs.items():
                row[key] = dict(min(results, key=lambda x: x["ms_per_step"]), ms_per_step_runs=[x["ms_per_step"] for x in results])
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    saved = {
        "threads": args.threads,
        "epoch_images": args.epoch_images,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "onnxruntime": versions,
        "command": " ".join(["python", "benchmarks/speed_memory.py", *sys.argv[1:]]),
        "rows": rows,
    }
    args.out.write_text(json.dumps(saved, indent=1))
    print(markdown(rows, args.epoch_images, args.threads))


def markdown(rows: list[dict], epoch_images: int, threads: int) -> str:
    """Two tables: step time and peak memory, then the per-epoch selection. "-" where a column was not run."""

    def ort(r):
        return r.get("ort_training") or r.get("onnx_neq")  # runs before the portable column called it onnx_neq

    def cell(x, key, fmt):
        return format(x[key], fmt) if x else "-"

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}" if a and b else "-"

    lines = [
        "| model | px | batch | ms/step ORT | ms/step portable | ms/step PyTorch | portable / ORT | ORT / PyTorch "
        "| peak RSS ORT (MiB) | peak RSS portable (MiB) | peak RSS PyTorch (MiB) | portable / ORT | ORT / PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, q, p = ort(r), r.get("portable"), r["pytorch"]
        lines.append(
            f"| {r['arch']} | {r['resolution']} | {r['batch']} "
            f"| {cell(o, 'ms_per_step', '.1f')} | {cell(q, 'ms_per_step', '.1f')} | {cell(p, 'ms_per_step', '.1f')} "
            f"| {ratio(q, o, 'ms_per_step')} | {ratio(o, p, 'ms_per_step')} "
            f"| {cell(o, 'peak_rss_mib', '.0f')} | {cell(q, 'peak_rss_mib', '.0f')} | {cell(p, 'peak_rss_mib', '.0f')} "
            f"| {ratio(q, o, 'peak_rss_mib')} | {ratio(o, p, 'peak_rss_mib')} |"
        )
    lines += [
        "",
        "| model | px | batch | selection s ORT | selection s portable | selection s PyTorch "
        "| selection share ORT | selection share portable | selection share PyTorch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, q, p = ort(r), r.get("portable"), r["pytorch"]
        steps = -(-epoch_images // r["batch"])

        def share(x, steps=steps):
            return f"{x['selection_s'] / (x['selection_s'] + steps * x['ms_per_step'] / 1000):.2%}" if x else "-"

        lines.append(
            f"| {r['arch']} | {r['resolution']} | {r['batch']} "
            f"| {cell(o, 'selection_s', '.3f')} | {cell(q, 'selection_s', '.3f')} | {cell(p, 'selection_s', '.3f')} "
            f"| {share(o)} | {share(q)} | {share(p)} |"
        )
    versions = []
    for key, label in (
        ("ort_training", "ORT = ort-training backend on onnxruntime-training"),
        ("portable", "portable = portable backend on stock onnxruntime"),
    ):
        found = sorted({r[key]["onnxruntime"] for r in rows if r.get(key) and "onnxruntime" in r[key]})
        if found:
            versions.append(f"{label} {', '.join(found)}")
    torch_versions = sorted({r["pytorch"]["torch"] for r in rows if "torch" in r["pytorch"]})
    if torch_versions:
        versions.append(f"PyTorch {', '.join(torch_versions)}")
    lines.append(
        f"\n{threads} threads each; an epoch = {epoch_images} training images; selection = taps of 10 images + phi + velocity + greedy selection."
        + (f" {'; '.join(versions)}." if versions else "")
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
