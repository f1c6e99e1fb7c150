"""Recipe for the shipped model: MobileNetV2 width 0.35, 32x32 input, trained from scratch on
Fashion-MNIST classes 0-4 (T-shirt, Trouser, Pullover, Dress, Coat), so that classes 5-9 and
the digits stay unseen target tasks. Needs torch (pip install -e ".[export]") and Debian's
dataset-fashion-mnist.

    python models/pretrain_fmnist04.py            # writes models/mobilenet_v2_035_fmnist04.{pth,json}, onnx_neq/models/*.onnx

Preprocessing is onnx-neq's own (onnx_neq.data.preprocess, mean = std = 0.5), so fine-tuning
sees inputs exactly as pretraining did.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from onnx_neq.architectures import build
from onnx_neq.data import load_dataset, preprocess, select_classes
from onnx_neq.export import export_module

HERE = Path(__file__).parent
MEAN = STD = [0.5, 0.5, 0.5]


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 2-pixel-padded crop and horizontal flip, on uint8 NHWC."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    dy, dx = rng.integers(0, 5, n), rng.integers(0, 5, n)
    out = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def evaluate(model: torch.nn.Module, split, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(split), batch):
            x = torch.from_numpy(preprocess(split.images[i : i + batch], 32, 3, MEAN, STD))
            correct += int((model(x).argmax(1).numpy() == split.labels[i : i + batch]).sum())
    return correct / len(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "mobilenet_v2_035_fmnist04")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = select_classes(load_dataset("fashion-mnist"), [0, 1, 2, 3, 4])
    model = build("mobilenet_v2", num_classes=5, width_mult=0.35)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
    steps = args.epochs * (len(data.train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    log = []
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(data.train))
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[i : i + args.batch_size]
            x = torch.from_numpy(preprocess(augment(data.train.images[idx], rng), 32, 3, MEAN, STD))
            loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(data.train.labels[idx]), label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        test = evaluate(model, data.test)
        log.append({"epoch": epoch, "loss": loss.item(), "test_top1": test, "minutes": (time.time() - start) / 60})
        print(json.dumps(log[-1]), flush=True)
    torch.save(model.state_dict(), args.out.with_suffix(".pth"))
    export_module(
        model,
        HERE.parent / "onnx_neq" / "models" / (args.out.name + ".onnx"),
        resolution=32,
        bn="frozen",
        mean=MEAN,
        std=STD,
        name="mobilenet_v2",
    )
    summary = {
        "recipe": vars(args) | {"out": str(args.out.name)},
        "test_top1_classes_0_4": log[-1]["test_top1"],
        "minutes": log[-1]["minutes"],
        "epochs": log,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
