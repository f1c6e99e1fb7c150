"""Speed and memory of onnx-neq (ONNX Runtime training) against a plain PyTorch loop, side by side.

Same model, weights, batch, resolution and masks; the PyTorch loop is the authors' method (zero the
masked channels' gradients, then SGD). Each measurement runs in its own process so peak resident
memory (VmHWM) is that framework's alone. Both use the same number of threads.

    python benchmarks/speed_memory.py                      # MobileNetV2 and ResNet-18 at 128 px, batch 8 and 32
    python benchmarks/speed_memory.py --quick              # one small case, to check the script

Reported per case: ms per training step (median), peak RSS, the velocity + selection time of one
epoch (taps of the 10-image velocity set, phi, velocity, greedy selection) as a share of an epoch
of --epoch-images training images, and the ratio onnx-neq / PyTorch of each.
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

HERE = Path(__file__).resolve().parent


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _select(taps, taps_prev, names, costs, budget, state):
    from onnx_neq.selectors import select_velocity
    from onnx_neq.velocity import layer_phi

    phi = layer_phi(taps, taps_prev, names)
    velocity = state.update(phi)
    return select_velocity(velocity, costs, budget)


def worker_ort(args) -> dict:
    from onnx_neq.backends.ort_training import TrainingSession
    from onnx_neq.velocity import VelocityState

    session = TrainingSession(args.artifacts, threads=args.threads)
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
    return {"ms_per_step": 1000 * float(np.median(times)), "selection_s": selection, "peak_rss_mib": _peak_rss_mib()}


def worker_torch(args) -> dict:
    import torch

    from onnx_neq.architectures import build
    from onnx_neq.velocity import VelocityState

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
    return {"ms_per_step": 1000 * float(np.median(times)), "selection_s": selection, "peak_rss_mib": _peak_rss_mib()}


def prepare_case(arch: str, resolution: int, workdir: Path) -> tuple[Path, Path, Path]:
    """Export (shared weights), prepare artifacts, and draw random masks at 30.8% of the budget."""
    import torch

    from onnx_neq.architectures import build
    from onnx_neq.export import export
    from onnx_neq.manifest import read_manifest
    from onnx_neq.prepare import prepare
    from onnx_neq.selectors import select_random, split_by_layer

    torch.manual_seed(0)
    weights = workdir / f"{arch}.pth"
    torch.save(build(arch, num_classes=10).state_dict(), weights)
    export(arch, workdir / f"{arch}.onnx", weights=weights, num_classes=10, resolution=resolution)
    artifacts = workdir / f"{arch}-artifacts"
    prepare(workdir / f"{arch}.onnx", artifacts)
    manifest = read_manifest(artifacts)
    costs = np.concatenate([np.full(l.out_channels, l.neuron_cost) for l in manifest.layers])
    selected = select_random(costs, int(manifest.selectable_params * 0.308), np.random.default_rng(0))
    masks = dict(zip([l.name for l in manifest.layers], split_by_layer(selected, [l.out_channels for l in manifest.layers])))
    np.savez(workdir / f"{arch}-masks.npz", **masks)
    return weights, artifacts, workdir / f"{arch}-masks.npz"


def run_worker(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["ort", "torch"])
    parser.add_argument("--arch")
    parser.add_argument("--artifacts")
    parser.add_argument("--weights")
    parser.add_argument("--masks")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epoch-images", type=int, default=1000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--table", type=Path, help="Only print the table of an earlier run's JSON.")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "speed_memory.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((worker_ort if args.worker == "ort" else worker_torch)(args)))
        return
    if args.table:
        saved = json.loads(args.table.read_text())
        print(markdown(saved["rows"], saved["epoch_images"], saved["threads"]))
        return
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
            ort = run_worker("ort", artifacts=artifacts, **common)
            pt = run_worker("torch", weights=weights, **common)
            rows.append({"arch": arch, "resolution": resolution, "batch": batch, "onnx_neq": ort, "pytorch": pt})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "epoch_images": args.epoch_images, "rows": rows}, indent=1))
    print(markdown(rows, args.epoch_images, args.threads))


def markdown(rows: list[dict], epoch_images: int, threads: int) -> str:
    lines = [
        "| model | px | batch | ms/step onnx-neq | ms/step PyTorch | ratio | peak RSS onnx-neq (MiB) | peak RSS PyTorch (MiB) | ratio "
        "| selection s onnx-neq | selection s PyTorch | ratio | selection share onnx-neq | selection share PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, p = r["onnx_neq"], r["pytorch"]
        steps = -(-epoch_images // r["batch"])

        def share(x, steps=steps):
            return x["selection_s"] / (x["selection_s"] + steps * x["ms_per_step"] / 1000)

        lines.append(
            f"| {r['arch']} | {r['resolution']} | {r['batch']} | {o['ms_per_step']:.1f} | {p['ms_per_step']:.1f} | {o['ms_per_step'] / p['ms_per_step']:.2f} "
            f"| {o['peak_rss_mib']:.0f} | {p['peak_rss_mib']:.0f} | {o['peak_rss_mib'] / p['peak_rss_mib']:.2f} "
            f"| {o['selection_s']:.3f} | {p['selection_s']:.3f} | {o['selection_s'] / p['selection_s']:.2f} | {share(o):.2%} | {share(p):.2%} |"
        )
    lines.append(
        f"\n{threads} threads each; an epoch = {epoch_images} training images; selection = taps of 10 images + phi + velocity + greedy selection."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
