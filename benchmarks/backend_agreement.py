"""How closely one portable SGD step follows the ORT backend's on a random-weight torchvision network with
batch-statistics BatchNorm (ResNet-50 by default, the deepest network the tests prepare).

    python benchmarks/backend_agreement.py [--arch resnet50] [--resolution 64] [--batch 8] [--seed 0]

Prints: how many ReLU outputs of the two training graphs' forward passes differ (bit for bit, and in sign),
the two losses, and the relative difference of each parameter's update (median, largest). Needs
onnxruntime-training (both backends run in one environment) and torch (to build the network).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.utils import Extractor

from onnx_neq.architectures import build
from onnx_neq.backends.base import open_backend
from onnx_neq.export import export
from onnx_neq.graph.prepare import prepare
from onnx_neq.ort_runtime import inference_session


def _relu_outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every ReLU output of a training graph's forward pass, computed by that graph's own nodes."""
    model = onnx.load(str(model_path))
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    inputs = [i.name for i in model.graph.input if i.name in feeds]
    session = inference_session(Extractor(model).extract_model(inputs, relus))
    return dict(zip(relus, session.run(relus, {k: feeds[k] for k in inputs})))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(build(args.arch, num_classes=10).state_dict(), work / "w.pth")
        export(args.arch, work / "m.onnx", work / "w.pth", 10, args.resolution, bn="train")
        manifest = prepare(work / "m.onnx", work / "art").manifest
        rng = np.random.default_rng(args.seed)
        x = rng.standard_normal((args.batch, *manifest.input.shape[1:])).astype(np.float32)
        y = rng.integers(0, 10, args.batch)
        ort, portable = open_backend("ort-training", work / "art"), open_backend("portable", work / "art")
        before = portable.parameters()
        feeds = {"input": x, **before}
        ours = _relu_outputs(work / "art" / manifest.files["portable_training_model"], feeds)
        theirs = _relu_outputs(work / "art" / manifest.files["training_model"], feeds)
        bits = sum(int((ours[k] != theirs[k]).sum()) for k in ours)
        signs = sum(int(((ours[k] > 0) != (theirs[k] > 0)).sum()) for k in ours)
        total = sum(v.size for v in ours.values())
        loss_o, _ = ort.train_step(x, y, 0.01)
        loss_p, _ = portable.train_step(x, y, 0.01)
        after_o, after_p = ort.parameters(), portable.parameters()
    diffs = []
    for name, old in before.items():
        update_o, update_p = after_o[name] - old, after_p[name] - old
        if np.linalg.norm(update_o) > 1e-6:
            diffs.append(float(np.linalg.norm(update_p - update_o) / np.linalg.norm(update_o)))
    print(f"{args.arch}, random weights, batch-statistics BatchNorm, batch {args.batch}, {args.resolution} px, seed {args.seed}")
    print(f"ReLU outputs of the forward pass that differ: {bits:,} of {total:,} (in sign: {signs})")
    print(f"loss: ORT {loss_o:.9g}, portable {loss_p:.9g}")
    print(
        f"update of each of {len(diffs)} parameters, portable against ORT: relative difference median {np.median(diffs):.1e}, max {max(diffs):.1e}"
    )


if __name__ == "__main__":
    main()
