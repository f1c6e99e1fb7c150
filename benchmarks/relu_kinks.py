"""Why float32 and float64 gradients of a random-weight ResNet-50 with batch-statistics BatchNorm differ by
percents: a handful of ReLU inputs sit so close to 0 that float32 rounding flips their side of the kink,
and each flip changes the gradient by a finite amount. On such a network two float32 implementations agree only where
their forward passes are equal bit for bit (benchmarks/backend_agreement.py).

    python benchmarks/relu_kinks.py [--batch 8] [--resolution 64]

Prints: how many ReLU masks differ between float32 and float64 PyTorch; the gradients' relative error
of float32 against float64 (median, max over tensors); and the same when the float64 pass reuses the
float32 pass's ReLU masks. If the flips are the cause, the second error is orders of magnitude smaller.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from onnx_neq.architectures import build


class _RecordedRelu(torch.nn.Module):
    """ReLU that records its masks (or replays recorded ones), one per call in call order."""

    def __init__(self, store: dict, key: str, replay: bool):
        super().__init__()
        self.store, self.key, self.replay, self.calls = store, key, replay, 0

    def forward(self, x):
        key = (self.key, self.calls)
        self.calls += 1
        if not self.replay:
            self.store[key] = x > 0
        return x * self.store[key].to(x.dtype)


def _gradients(model, x, y, dtype, store: dict, replay: bool) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).to(dtype)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(module, child_name, _RecordedRelu(store, f"{name}.{child_name}", replay))
    torch.nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
    return {n: p.grad.double() for n, p in model.named_parameters()}


def _errors(grads, reference) -> tuple[float, float]:
    errors = [((grads[n] - g).norm() / g.norm()).item() for n, g in reference.items() if g.norm() > 1e-9]
    return float(np.median(errors)), float(max(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = build("resnet50", num_classes=10).train()
    rng = np.random.default_rng(args.seed)
    x = torch.from_numpy(rng.standard_normal((args.batch, 3, args.resolution, args.resolution)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, args.batch))
    masks32, masks64 = {}, {}
    g32 = _gradients(model, x, y, torch.float32, masks32, replay=False)
    g64 = _gradients(model, x, y, torch.float64, masks64, replay=False)
    g64_same_kinks = _gradients(model, x, y, torch.float64, masks32, replay=True)
    flips = sum(int((masks32[k] != masks64[k]).sum()) for k in masks32)
    total = sum(m.numel() for m in masks32.values())
    print(f"ResNet-50, random weights, batch-statistics BatchNorm, batch {args.batch}, {args.resolution} px, seed {args.seed}")
    print(f"ReLU inputs on the other side of 0 in float32 than in float64: {flips} of {total:,}")
    for label, reference in (("float64", g64), ("float64 with float32's ReLU masks", g64_same_kinks)):
        median, largest = _errors(g32, reference)
        print(f"float32 gradients against {label}: relative error per tensor, median {median:.2e}, max {largest:.2e}")


if __name__ == "__main__":
    main()
