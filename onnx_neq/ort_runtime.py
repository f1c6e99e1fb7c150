"""Access to onnxruntime-training without torch.

`import onnxruntime.training` runs a package __init__ that imports torch (for ORTModule).
Edge boards have onnxruntime-training and numpy only, so we register a bare package object
for `onnxruntime.training` and import just the submodules we need (`api`, `artifacts`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import types
from collections.abc import Iterator

import numpy as np

ORT_DTYPES = {  # onnxruntime's NodeArg.type -> the numpy dtype of an array fed to it
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def onnxruntime():
    """The onnxruntime module, imported so that it does not pull in torch.

    On import, onnxruntime probes `onnxruntime.training.ortmodule` (which imports torch) and
    treats an ImportError as "no ORTModule". Registering a bare training package and marking
    ortmodule absent first makes that probe fail fast, torch installed or not.
    """
    if "onnxruntime" not in sys.modules:
        _bare_training_package()
        sys.modules.setdefault("onnxruntime.training.ortmodule", None)
    import onnxruntime as ort

    return ort


def _bare_training_package() -> None:
    if "onnxruntime.training" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        from onnx_neq.errors import NeqError

        raise NeqError("onnxruntime is not installed: pip install onnxruntime")
    pkg = types.ModuleType("onnxruntime.training")
    pkg.__path__ = [os.path.join(spec.submodule_search_locations[0], "training")]
    sys.modules["onnxruntime.training"] = pkg


TRAINING_WHEEL = "onnxruntime-training-cpu==1.19.2 (x86_64 Linux, macOS or Windows, Python <= 3.12)"


def training_api():
    """The `onnxruntime.training.api` module (Module, Optimizer, CheckpointState)."""
    onnxruntime()
    _bare_training_package()
    try:
        from onnxruntime.training import api
    except ImportError:
        from onnx_neq.errors import NeqError

        raise NeqError(
            f"this needs onnxruntime-training, which is not installed; it replaces stock onnxruntime, so use a virtualenv of its own "
            f"({TRAINING_WHEEL}): pip install -r requirements/ort-training.txt && pip install --no-deps onnx-neq"
        ) from None
    return api


def has_training() -> bool:
    """Whether onnxruntime-training (its artifacts generator) is installed, without importing torch."""
    try:
        artifacts_module()
    except Exception:  # NeqError where it is missing; anything else means it is unusable here
        return False
    return True


def artifacts_module():
    """The `onnxruntime.training.artifacts` module (generate_artifacts, LossType, OptimType)."""
    onnxruntime()
    _bare_training_package()
    try:
        from onnxruntime.training import artifacts
    except ImportError:
        from onnx_neq.errors import NeqError

        raise NeqError(
            f"onnxruntime-training's artifacts need onnxruntime-training, which is not installed here ({TRAINING_WHEEL}); "
            "onnx-neq's own artifacts need only stock onnxruntime"
        ) from None
    return artifacts


def inference_session(model, threads: int = 0):
    """An onnxruntime.InferenceSession for a ModelProto or a path, with ORT's chatter silenced."""
    ort = onnxruntime()
    source = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        from onnx_neq.errors import NeqError, first_line

        raise NeqError(
            f"ONNX Runtime cannot load the model ({first_line(exc)}); it is damaged or not a valid ONNX classifier, re-export it"
        ) from None


def session_options(threads: int = 0, memory_pattern: bool = False):
    """SessionOptions with ORT's log chatter off, a thread count if given, and no memory pattern unless asked.

    The memory pattern (ORT's default) plans one block for all intermediate tensors of a run. For the
    lowered training graphs it nearly doubles peak RSS (MobileNetV2 128 px, batch 32: 1.9 GiB with it,
    1.0 GiB without) and measured no faster (docs/benchmarks/budget-step.md, the budget table's specialized-pattern
    rows). Memory is what a board lacks, so it is off unless asked for (--memory-pattern)."""
    opts = onnxruntime().SessionOptions()
    opts.log_severity_level = 4  # fatal only: a failure reaches the user as the exception's one line, not as native log lines
    opts.enable_mem_pattern = memory_pattern
    if threads:
        opts.intra_op_num_threads = threads
    return opts


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to fd 2 (ORT logs every graph transformer at INFO)."""
    sink: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))
