"""Which artifacts a run trains: the shipped model, or the user's with a head fitted to the data.

The shipped MobileNetV2 0.35 (Fashion-MNIST classes 0-4) and any artifacts whose head does not
match the data's class count are prepared (again) with a fresh head of the right width, once,
into the cache (~/.cache/onnx-neq, or $XDG_CACHE_HOME/onnx-neq).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from onnx_neq.errors import NeqError
from onnx_neq.manifest import FILENAME, Manifest, artifacts_fingerprint, read_manifest

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "mobilenet_v2_035_fmnist04.onnx"
LOCAL_ARTIFACTS = Path("artifacts")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnx-neq"


def default_artifacts(num_classes: int) -> Path:
    """Artifacts of the shipped model with a fresh head of `num_classes`, prepared once and cached."""
    if not SHIPPED.exists():
        raise NeqError(f"the shipped model {SHIPPED} is missing from this installation; pass an ARTIFACTS_DIR made by `onnx-neq prepare`")
    digest = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()[:12]
    out = cache_dir() / f"{SHIPPED.stem}-{digest}-{num_classes}classes"
    if not _complete(out):
        from onnx_neq.graph.prepare import prepare

        prepare(SHIPPED, out, num_classes=num_classes)
    return out


def _complete(directory: Path) -> bool:
    """Cached artifacts hold every file this version writes (older ones lack the portable model)."""
    from onnx_neq.graph.artifacts import FILES

    return (directory / FILENAME).exists() and all((directory / name).exists() for name in FILES.values())


def local_artifacts() -> Path | None:
    """./artifacts when it holds artifacts (what `onnx-neq prepare MODEL` writes by default)."""
    return LOCAL_ARTIFACTS.resolve() if (LOCAL_ARTIFACTS / FILENAME).exists() else None


def artifacts_with_head(artifacts: str | Path, num_classes: int) -> Path:
    """`artifacts` prepared again from their source model with a fresh head of `num_classes`, cached."""
    manifest = read_manifest(artifacts)
    if manifest.num_classes == num_classes:
        return Path(artifacts)
    source = Path(manifest.source_model)
    options = manifest.prepare_options
    fix = f"re-run `onnx-neq prepare MODEL.onnx --num-classes {num_classes}` and train those artifacts"
    if options is None:
        raise NeqError(f"the model's head has {manifest.num_classes} classes, the data {num_classes}; {fix}")
    if not source.exists():
        raise NeqError(
            f"the model's head has {manifest.num_classes} classes, the data {num_classes}, and its source {source} is gone; {fix}"
        )
    out = cache_dir() / f"{source.stem}-{artifacts_fingerprint(artifacts)[:12]}-{num_classes}classes"
    if not _complete(out):
        from onnx_neq.graph.prepare import prepare

        prepare(source, out, **{**options, "num_classes": num_classes})
    return out


def head_change(manifest: Manifest, dataset) -> str:
    return (
        f"the model's head has {manifest.num_classes} classes and {dataset.name} has {dataset.num_classes}: "
        f"training a fresh {dataset.num_classes}-class head (artifacts prepared with --num-classes {dataset.num_classes}, cached in {cache_dir()})"
    )
