"""The embedded default: the shipped MobileNetV2 0.35 (Fashion-MNIST classes 0-4), prepared on demand."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import NeqError

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "mobilenet_v2_035_fmnist04.onnx"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnx-neq"


def default_artifacts(num_classes: int) -> Path:
    """Artifacts of the shipped model with a fresh head of `num_classes`, prepared once and cached."""
    from .manifest import FILENAME
    from .prepare import prepare

    if not SHIPPED.exists():
        raise NeqError(
            f"the shipped model {SHIPPED} is missing (it lives in the source checkout's models/); pass an ARTIFACTS_DIR made by `onnx-neq prepare`"
        )
    digest = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()[:12]
    out = cache_dir() / f"{SHIPPED.stem}-{digest}-{num_classes}classes"
    if not (out / FILENAME).exists():
        prepare(SHIPPED, out, num_classes=num_classes)
    return out
