"""CNN architectures written with torchvision's state-dict keys (export needs torch)."""

from __future__ import annotations

from collections.abc import Callable

ARCHITECTURES = ("resnet18", "resnet50", "mobilenet_v2")


def build(arch: str, num_classes: int = 1000, width_mult: float = 1.0):
    """Return an untrained torch module for `arch` (one of ARCHITECTURES)."""
    from onnx_neq.architectures.mobilenet_v2 import mobilenet_v2
    from onnx_neq.architectures.resnet import resnet18, resnet50

    builders: dict[str, Callable] = {
        "resnet18": lambda: resnet18(num_classes),
        "resnet50": lambda: resnet50(num_classes),
        "mobilenet_v2": lambda: mobilenet_v2(num_classes, width_mult),
    }
    if arch not in builders:
        from onnx_neq.errors import NeqError

        raise NeqError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if width_mult != 1.0 and arch != "mobilenet_v2":
        from onnx_neq.errors import NeqError

        raise NeqError(f"--width-mult applies to mobilenet_v2 only, not {arch}")
    return builders[arch]()
