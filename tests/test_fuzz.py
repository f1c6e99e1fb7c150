"""Fuzz the files a user can hand us (issue "Untrusted files and unusual models").

Seeded random mutations of a valid model, of each file of an artifacts folder, of a data .npz, of a
run's settings.json and of a Sparse Update scheme: bit flips, truncations, wrong dtypes and shapes,
hostile paths. Every command must exit 0, 2 or 3; a failing one says so in one `onnx-neq:` line on
stderr (never a traceback, never an internal error), writes nothing outside its output folder, and
leaves that folder empty (a retry is not blocked) when it failed before its first epoch. Hostile
paths point at sentinel files (`secret`, `secret.npz`) whose content must appear in no output.

Each case runs the CLI in-process (click's CliRunner, the code path of `onnx-neq`) inside a forked
child, so that a crash, a hang or a runaway allocation is reported as that case's failure instead
of ending the session; the child's own stdout/stderr (native ORT output) is captured too.

    default suite: FUZZ_SEED (0), the per-kind counts below (about 250 cases)
    pytest -m slow tests/test_fuzz.py: FUZZ_SLOW_CASES cases per kind (default 400), seed FUZZ_SEED + 1
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import resource
import select
import shutil
import signal
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto  # noqa: E402

from onnx_neq.cli import main  # noqa: E402

SEED = int(os.environ.get("FUZZ_SEED", "0"))
DEFAULT_COUNTS = {"model": 50, "artifacts": 70, "data": 45, "settings": 45, "su-scheme": 40}
# FUZZ_VERBOSE=1 (with -s or not): one line per case, its exit status and first error line
SLOW_CASES = int(os.environ.get("FUZZ_SLOW_CASES", "400"))
TIMEOUT = float(os.environ.get("FUZZ_TIMEOUT", "120"))  # seconds per case before it counts as a hang
MEMORY_HEADROOM = 6 << 30  # a case may allocate this much beyond the forked process's size
COUNTS: dict[str, int] = {}

TRAIN = ["--epochs", "1", "--batch-size", "8", "--threads", "1"]
PROGRESS = re.compile(r"^([a-z]+ {2,}\S|\s+\d+\s)")  # train's own stderr lines: "budget    ...", the epoch table
ONNX_FILES = ["eval_model.onnx", "portable_training_model.onnx", "training_model.onnx", "optimizer_model.onnx"]
ARTIFACT_FILES = ["manifest.json", *ONNX_FILES, "parameters.npz", "checkpoint"]


# sentinels: what hostile paths point at -----------------------------------------------------------

# eight small float32 values: loaded as weights they still train, and 32 bytes no output holds by chance
TOKEN = np.random.default_rng([20240601, SEED]).uniform(-0.5, 0.5, 8).astype(np.float32)
TOKEN_BYTES = TOKEN.tobytes()


def _token_array(shape, dtype=np.float32) -> np.ndarray:
    return np.resize(TOKEN, shape).astype(dtype)


def _write_sentinels(case: Path, parameters: Path) -> None:
    """case/secret (raw token bytes, 128 KiB), case/secret.npz (the artifacts' parameters, every float
    array filled with the token), case/victim/keep.txt (a folder hostile output paths point at)."""
    (case / "secret").write_bytes(TOKEN_BYTES * 4096)
    with np.load(parameters) as z:
        arrays = {k: _token_array(z[k].shape, z[k].dtype) if z[k].dtype.kind == "f" else z[k] for k in z.files}
    np.savez(case / "secret.npz", **arrays)
    (case / "victim").mkdir()
    (case / "victim" / "keep.txt").write_text("keep\n")


# running one case ---------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    index: int
    mutation: str
    setup: Callable[[Ctx], Invocation]

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.index:04d}-{self.mutation}"


@dataclass
class Ctx:
    case: Path  # the case's folder: cwd of the command, sentinels, inputs, output folder
    rng: np.random.Generator
    bases: Bases


@dataclass
class Invocation:
    args: list[str]
    output: Path  # the command's own output folder
    command: str  # train | resume | prepare | export
    export_file: Path | None = None


@dataclass
class Outcome:
    case: Case
    args: list[str]
    exit: int | None
    stderr: str
    problems: list[str] = field(default_factory=list)

    def first_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        error = next((line for line in lines if line.startswith("onnx-neq:")), lines[-1] if lines else "")
        return error[:300]


def _run_case(case: Case, root: Path, bases: Bases, cache: Path, seed: int) -> Outcome:
    folder = root / case.id
    folder.mkdir(parents=True)
    _write_sentinels(folder, bases.artifacts / "parameters.npz")
    rng = np.random.default_rng([seed, list(DEFAULT_COUNTS).index(case.kind), case.index])
    try:
        inv = case.setup(Ctx(folder, rng, bases))
    except Exception:
        return Outcome(case, [], None, "", [f"fuzz setup failed (a bug of the test): {traceback.format_exc()[-400:]}"])
    before = _snapshot(folder, inv.output)
    settings = inv.output / "settings.json"
    run_before = _snapshot(inv.output, None) if inv.command == "resume" and inv.output.is_dir() else None
    settings_before = settings.read_bytes() if inv.command == "resume" and settings.is_file() else None
    scratch = root / "_tmp" / case.id
    scratch.mkdir(parents=True)
    native = root / "_native" / f"{case.id}.txt"
    native.parent.mkdir(exist_ok=True)
    result, crash = _isolated(lambda: _invoke(inv.args, folder, cache / case.id, scratch, native), TIMEOUT)
    outcome = Outcome(case, inv.args, None if result is None else result["exit"], "" if result is None else result["stderr"])
    if crash is not None:
        outcome.problems.append(crash)
        return outcome
    p = outcome.problems
    native_text = native.read_text(errors="replace") if native.exists() else ""
    if result["exception"]:
        p.append("uncaught exception: " + result["exception"].strip().splitlines()[-1][:200])
    if outcome.exit not in (0, 2, 3):
        p.append(f"exit {outcome.exit}")
    everything = result["stderr"] + result["stdout"] + native_text
    if "Traceback" in everything:
        p.append("a traceback was printed")
    if outcome.exit != 0:
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("onnx-neq:")]
        if len(errors) != 1 or lines[-1] != errors[0]:
            p.append(f"stderr is not one final 'onnx-neq:' line ({len(errors)} such lines of {len(lines)})")
        others = [line for line in lines if not line.startswith("onnx-neq:") and not _progress_line(line, inv.command)]
        if others:
            p.append(f"other stderr lines: {others[:2]}")
        if "internal error" in result["stderr"]:
            p.append("internal error")
        if native_text.strip():
            p.append(f"native output: {native_text.strip().splitlines()[0][:200]}")
    after = _snapshot(folder, inv.output)
    changed = _diff(before, after)
    if changed:
        p.append(f"wrote outside its output folder: {changed[:4]}")
    left = [str(x.relative_to(scratch)) for x in scratch.rglob("*")]
    if left:
        p.append(f"left temporary files: {left[:3]}")
    leaks = _leaks(inv.output, result["stdout"] + result["stderr"])
    if leaks:
        p.append(f"sentinel content in {leaks[:3]}")
    if outcome.exit != 0:
        p.extend(_output_problems(inv, settings_before, run_before, outcome.exit))
    if not p:
        shutil.rmtree(folder, ignore_errors=True)  # keep the folders of failing cases for reproduction
    return outcome


def _progress_line(line: str, command: str) -> bool:
    return command in ("train", "resume") and PROGRESS.match(line) is not None


def _output_problems(inv: Invocation, settings_before: bytes | None, run_before: dict | None, code: int) -> list[str]:
    out = inv.output
    if inv.command == "prepare":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            return [f"failed prepare left {_names(out)} in {out.name}/"]
    elif inv.command == "export":
        if inv.export_file is not None and (inv.export_file.exists() or inv.export_file.is_symlink()):
            return [f"failed export left {inv.export_file.name}"]
    elif inv.command == "train":
        if out.exists() and not _committed_epochs(out):
            extra = [n for n in _names(out)] if out.is_dir() else [out.name]
            extra = [n for n in extra if n != ".lock"]
            if extra:
                return [f"failed before its first epoch but left {extra[:5]} in {out.name}/ (a retry is refused)"]
    elif inv.command == "resume":
        problems = []
        settings = out / "settings.json"
        if settings_before is not None and (not settings.is_file() or settings.read_bytes() != settings_before):
            problems.append("refused resume rewrote settings.json")
        if code == 2 and run_before is not None:
            changed = [c for c in _diff(run_before, _snapshot(out, None)) if not c.endswith(".lock")]
            if changed:
                problems.append(f"refused resume changed the run: {changed[:4]}")
        return problems
    return []


def _committed_epochs(run: Path) -> int:
    metrics = run / "metrics.csv"
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text(errors="replace").splitlines()[1:] if line.strip())


def _names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.is_dir() else []


def _snapshot(root: Path, exclude: Path | None) -> dict[str, tuple]:
    """Every path under root (symlinks not followed) with its type and content digest, less `exclude`."""
    shot = {}
    if not root.exists():
        return shot
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = base / name
            if exclude is not None and path == exclude:
                continue
            rel = str(path.relative_to(root))
            if path.is_symlink():
                shot[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                shot[rel] = ("dir",)
            elif path.is_file():
                shot[rel] = ("file", hashlib.sha1(path.read_bytes()).hexdigest())
            else:
                shot[rel] = ("other",)
        dirnames[:] = [d for d in dirnames if not (base / d).is_symlink() and (exclude is None or base / d != exclude)]
    return shot


def _diff(before: dict, after: dict) -> list[str]:
    out = [f"+{k}" for k in sorted(after.keys() - before.keys())] + [f"-{k}" for k in sorted(before.keys() - after.keys())]
    return out + [f"~{k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]


def _leaks(output: Path, text: str) -> list[str]:
    found = ["stdout/stderr"] if TOKEN_BYTES.hex() in text or TOKEN_BYTES in text.encode(errors="replace") else []
    paths = [output] if output.is_file() else (output.rglob("*") if output.is_dir() else [])
    for path in paths:
        if path.is_file() and not path.is_symlink() and TOKEN_BYTES in path.read_bytes():
            found.append(str(path.relative_to(output.parent)))
    return found


def _invoke(args: list[str], cwd: Path, cache: Path, scratch: Path, native: Path) -> dict:
    """In the forked child: the CLI as a user runs it (default warnings and logging, native output captured)."""
    fd = os.open(native, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    size = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_HEADROOM, size + MEMORY_HEADROOM))
    os.chdir(cwd)
    os.environ["XDG_CACHE_HOME"] = str(cache)
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = str(scratch)
    logging.root.handlers.clear()  # pytest's capture handler; the CLI installs its own on stderr
    logging.root.setLevel(logging.WARNING)
    warnings.resetwarnings()
    for action, category in (("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning), ("ignore", ImportWarning)):
        warnings.filterwarnings(action, category=category)
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: __import__("sys").stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line)
    )
    result = CliRunner().invoke(main, args)
    exception = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exception = "".join(traceback.format_exception(*result.exc_info))
    return {"exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr, "exception": exception}


def _isolated(fn: Callable[[], dict], timeout: float) -> tuple[dict | None, str | None]:
    """fn() in a forked child: (its result, None), or (None, how the child died)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            try:
                payload = json.dumps({"ok": fn()}).encode()
            except BaseException:
                payload = json.dumps({"error": traceback.format_exc()}).encode()
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None, f"hung: no result after {timeout:.0f}s"
            if select.select([r], [], [], left)[0]:
                data = os.read(r, 1 << 16)
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return None, f"crashed: killed by {signal.Signals(os.WTERMSIG(status)).name}"
    if not chunks:
        return None, f"the child exited with status {os.waitstatus_to_exitcode(status)} and no result"
    payload = json.loads(b"".join(chunks))
    if "error" in payload:
        return None, "the fuzz harness failed in the child: " + payload["error"].strip().splitlines()[-1]
    return payload["ok"], None


# bases: the valid inputs every mutation starts from -----------------------------------------------


@dataclass
class Bases:
    model: bytes  # the tiny CNN's .onnx
    artifacts: Path  # prepared from it
    data: Path  # a valid .npz for it: 64 train / 20 test images, 8x8x3 uint8, 5 classes
    runs: dict[str, Path]  # name -> template folder holding art/, data.npz and run/


def _valid_arrays(n_train: int = 64, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([SEED, 99])
    return {
        "x_train": rng.integers(0, 256, (n_train, 8, 8, 3)).astype(np.uint8),
        "y_train": (np.arange(n_train) % 5).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, 8, 8, 3)).astype(np.uint8),
        "y_test": (np.arange(n_test) % 5).astype(np.int64),
    }


def _make_run(template: Path, epochs: int, stop_epoch: int | None, backend: str) -> None:
    from onnx_neq.training.train import TrainConfig, train

    def progress(event, info):
        if stop_epoch is not None and event == "step" and info["epoch"] == stop_epoch and info["step"] == 2:
            raise KeyboardInterrupt

    config = TrainConfig(
        artifacts=str(template / "art"),
        data=f"npz:{template / 'data.npz'}",
        out=str(template / "run"),
        epochs=epochs,
        warmup_epochs=1,
        batch_size=8,
        threads=1,
        backend=backend,
    )
    try:
        train(config, progress=progress)
    except KeyboardInterrupt:
        pass


@pytest.fixture(scope="module")
def bases(tiny_onnx, tiny_artifacts, tmp_path_factory) -> Bases:
    import onnx_neq.backends.ort_training  # noqa: F401  (imported once here, not in every child)
    import onnx_neq.backends.portable  # noqa: F401
    import onnx_neq.graph.prepare  # noqa: F401
    import onnx_neq.training.train  # noqa: F401

    root = tmp_path_factory.mktemp("fuzz_bases")
    data = root / "data.npz"
    np.savez(data, **_valid_arrays())
    runs = {}
    for name, epochs, stop, backend in (
        ("interrupted", 2, 1, "portable"),
        ("finished", 1, None, "portable"),
        ("interrupted-ort", 2, 1, "ort-training"),
    ):
        template = root / name
        shutil.copytree(tiny_artifacts, template / "art")
        shutil.copy(data, template / "data.npz")
        result, crash = _isolated(lambda t=template, e=epochs, s=stop, b=backend: _make_run(t, e, s, b) or {}, 300)
        assert crash is None and (template / "run" / "settings.json").exists(), crash
        runs[name] = template
    return Bases(Path(tiny_onnx[0]).read_bytes(), Path(tiny_artifacts), data, runs)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if COUNTS:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\nfuzz cases: " + ", ".join(f"{k} {v}" for k, v in COUNTS.items()) + f" (total {sum(COUNTS.values())})")


# generic mutations --------------------------------------------------------------------------------


def _pick(rng, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def _bit_flips(data: bytes, rng, most: int = 8) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, most + 1))):
        if out:
            i = int(rng.integers(len(out)))
            out[i] ^= 1 << int(rng.integers(8))
    return bytes(out)


def _truncated(data: bytes, rng) -> bytes:
    return data[: int(rng.integers(0, max(len(data), 1)))]


HOSTILE_VALUES = [
    "abc", "", -1, 0, 1, 2**63, 10**30, -1e308, 1.5, float("nan"), float("inf"), None, True, [], {}, [None],
    {"a": [1, {"b": None}]}, "../x", "/etc/passwd", "\u00e9\x00", [[[[1]]]],
]  # fmt: skip


def _json_paths(obj, prefix=()) -> list[tuple]:
    paths = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        paths.append((*prefix, key))
        paths.extend(_json_paths(value, (*prefix, key)))
    return paths


def _mutate_json(obj, rng, within: tuple = ()) -> str:
    """Change one value under `within` (a key path): a hostile value, a removed key or an added one."""
    paths = [p for p in _json_paths(obj) if p[: len(within)] == within and len(p) > len(within)] or [within]
    path = paths[int(rng.integers(len(paths)))]
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    op = _pick(rng, ["value", "value", "value", "remove", "add"])
    if op == "remove" and isinstance(parent, dict):
        del parent[path[-1]]
        return f"remove {'.'.join(map(str, path))}"
    if op == "add" and isinstance(parent, dict):
        parent["fuzz_unknown"] = 1
        return f"add {'.'.join(map(str, path[:-1]))}.fuzz_unknown"
    value = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
    parent[path[-1]] = value
    return f"{'.'.join(map(str, path))}={value!r}"


def _replace_with(path: Path, how: str, ctx: Ctx) -> None:
    """Replace a file by a directory, a symlink to a sentinel, nothing, or an empty file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if how == "directory":
        path.mkdir()
    elif how == "symlink_secret":
        target = ctx.case / ("secret.npz" if path.suffix == ".npz" else "secret")
        path.symlink_to(os.path.relpath(target, path.parent))
    elif how == "empty":
        path.write_bytes(b"")
    # "deleted": nothing


# ONNX mutations --------------------------------------------------------------------------------------


def _externalize(tensor: TensorProto, location: str, rng) -> None:
    """Point the tensor's data at `location` (raw bytes), at an offset inside the 128 KiB sentinel."""
    length = _nbytes(tensor)
    offset = int(rng.integers(0, 1024)) * 4
    tensor.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data"):
        tensor.ClearField(f)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _nbytes(tensor: TensorProto) -> int:
    from onnx import helper

    n = int(np.prod(list(tensor.dims))) if tensor.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


DTYPES = [TensorProto.DOUBLE, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.BOOL, TensorProto.STRING, 0, 999]
OP_NAMES = ["FuzzOp", "conv", "Conv2", "Sigmoid", "Identity", "MaxPool", "", "Gemm"]


def _mutate_onnx(model: onnx.ModelProto, mutation: str, ctx: Ctx, folder: Path) -> str:
    """Apply `mutation` to `model` (saved into `folder` by the caller); returns a short description."""
    rng = ctx.rng
    graph = model.graph
    inits = list(graph.initializer)
    pick = inits[int(rng.integers(len(inits)))] if inits else None
    tensor_mutations = ("init_dims", "dtype", "raw_short", "huge_shape", "ext_abs", "ext_parent", "ext_symlink", "ext_in_folder")
    if mutation in tensor_mutations and pick is None:
        # a graph without initializers (eval, optimizer models): give one of its inputs a value
        name = next((i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT and "weight" in i.name), None)
        if name is None:
            name = graph.input[0].name if graph.input else "fuzz"
        dims = [d.dim_value or 1 for d in graph.input[0].type.tensor_type.shape.dim] if graph.input else [4]
        for value in graph.input:
            if value.name == name:
                dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        pick = graph.initializer.add()
        pick.name, pick.data_type = name, TensorProto.FLOAT
        pick.dims.extend(dims)
        pick.raw_data = np.zeros(dims, np.float32).tobytes()
    elif mutation in ("ext_abs", "ext_parent", "ext_symlink", "ext_in_folder"):
        floats = [t for t in inits if t.data_type == TensorProto.FLOAT and _nbytes(t) >= 64]
        pick = floats[int(rng.integers(len(floats)))] if floats else pick
    if mutation == "init_dims" and pick is not None:
        dims = list(pick.dims)
        how = _pick(rng, ["grow", "drop", "add", "zero", "negative"])
        if how == "grow" and dims:
            dims[int(rng.integers(len(dims)))] += 1
        elif how == "drop" and dims:
            dims.pop()
        elif how == "zero" and dims:
            dims[int(rng.integers(len(dims)))] = 0
        elif how == "negative" and dims:
            dims[int(rng.integers(len(dims)))] = -3
        else:
            dims.append(2)
        del pick.dims[:]
        pick.dims.extend(dims)
        return f"{pick.name} dims -> {dims}"
    if mutation == "dtype" and pick is not None:
        pick.data_type = int(DTYPES[int(rng.integers(len(DTYPES)))])
        return f"{pick.name} data_type -> {pick.data_type}"
    if mutation == "raw_short" and pick is not None:
        raw = pick.raw_data
        pick.raw_data = raw[: int(rng.integers(0, max(len(raw), 1)))]
        return f"{pick.name} raw_data {len(raw)} -> {len(pick.raw_data)} bytes"
    if mutation == "huge_shape" and pick is not None:
        dims = [1_000_000, 3_000_000] if rng.random() < 0.5 else [3, 1_000_000, 1_000_000, 1]
        del pick.dims[:]
        pick.dims.extend(dims)
        pick.raw_data = pick.raw_data[:16]
        return f"{pick.name} dims -> {dims} with 16 bytes"
    if mutation == "ext_abs":
        _externalize(pick, str(ctx.case / "secret"), rng)
        return f"{pick.name} -> {ctx.case / 'secret'}"
    if mutation == "ext_parent":
        rel = os.path.relpath(ctx.case / "secret", folder)
        _externalize(pick, rel, rng)
        return f"{pick.name} -> {rel}"
    if mutation == "ext_symlink":
        link = folder / "weights.bin"
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(ctx.case / "secret", folder))
        _externalize(pick, "weights.bin", rng)
        return f"{pick.name} -> weights.bin -> secret"
    if mutation == "ext_in_folder":  # a valid external-data file beside the model: the control case
        data = np.frombuffer(pick.raw_data, np.uint8).tobytes() if pick.raw_data else b""
        (folder / "weights.data").write_bytes(b"\0" * 4096 + data)
        length = len(data)
        pick.ClearField("raw_data")
        pick.data_location = TensorProto.EXTERNAL
        del pick.external_data[:]
        for key, value in (("location", "weights.data"), ("offset", "4096"), ("length", str(length))):
            entry = pick.external_data.add()
            entry.key, entry.value = key, value
        return f"{pick.name} -> weights.data (valid)"
    if mutation == "dup_names" and len(graph.node) >= 2:
        a, b = (int(i) for i in rng.choice(len(graph.node), 2, replace=False))
        graph.node[b].name = graph.node[a].name
        return f"node {b} named {graph.node[a].name!r}"
    if mutation == "op_renamed" and graph.node:
        node = graph.node[int(rng.integers(len(graph.node)))]
        old, node.op_type = node.op_type, OP_NAMES[int(rng.integers(len(OP_NAMES)))]
        return f"{old} -> {node.op_type!r}"
    if mutation == "io_changed" and graph.input:
        value = graph.input[0]
        how = _pick(rng, ["dtype", "rank", "channels", "output_dtype"])
        if how == "dtype":
            value.type.tensor_type.elem_type = TensorProto.INT64
        elif how == "rank":
            dims = value.type.tensor_type.shape.dim
            while len(dims) > 2:
                del dims[-1]
        elif how == "channels" and len(value.type.tensor_type.shape.dim) > 1:
            value.type.tensor_type.shape.dim[1].dim_value = 4
        else:
            graph.output[0].type.tensor_type.elem_type = TensorProto.STRING
        return f"{value.name}: {how}"
    if mutation == "versions":
        how = _pick(rng, ["opset_99", "opset_1", "ir_99", "domain"])
        if how == "opset_99":
            model.opset_import[0].version = 99
        elif how == "opset_1":
            model.opset_import[0].version = 1
        elif how == "ir_99":
            model.ir_version = 99
        else:
            model.opset_import[0].domain = "fuzz.domain"
        return how
    return "unchanged"


ONNX_MUTATIONS = [
    "init_dims", "dtype", "raw_short", "huge_shape", "ext_abs", "ext_parent", "ext_symlink", "ext_in_folder",
    "dup_names", "op_renamed", "io_changed", "versions",
]  # fmt: skip


# kind: model -> prepare ----------------------------------------------------------------------------

MODEL_MUTATIONS = ["bit_flip", "truncate", *ONNX_MUTATIONS, "empty", "directory", "symlink_secret", "not_onnx"]


def _model_case(mutation: str, command: str) -> Callable[[Ctx], Invocation]:
    def setup(ctx: Ctx) -> Invocation:
        folder = ctx.case / "m"
        folder.mkdir()
        path = folder / "model.onnx"
        if mutation == "bit_flip":
            path.write_bytes(_bit_flips(ctx.bases.model, ctx.rng, 2))
        elif mutation == "truncate":
            path.write_bytes(_truncated(ctx.bases.model, ctx.rng))
        elif mutation in ("empty", "directory", "symlink_secret"):
            _replace_with(path, mutation, ctx)
        elif mutation == "not_onnx":
            path.write_bytes(_pick(ctx.rng, [b"PK\x03\x04junk", b"\x08\x07\x12\x03abc" * 50, b'{"graph": {}}', bytes(4096)]))
        else:
            model = onnx.ModelProto.FromString(ctx.bases.model)
            _mutate_onnx(model, mutation, ctx, folder)
            path.write_bytes(model.SerializeToString())
        if command == "eval":
            shutil.copy(ctx.bases.data, ctx.case / "data.npz")
            return Invocation(["eval", str(path), "--data", f"npz:{ctx.case / 'data.npz'}"], ctx.case / "_writes_nothing", "eval")
        out = ctx.case / "art"
        return Invocation(["prepare", str(path), "-o", str(out)], out, "prepare")

    return setup


def model_cases(seed: int, n: int) -> list[Case]:
    """Every third round of the mutations runs `eval MODEL` instead of `prepare MODEL`."""
    cases = []
    for i in range(n):
        mutation = MODEL_MUTATIONS[i % len(MODEL_MUTATIONS)]
        command = "eval" if (i // len(MODEL_MUTATIONS)) % 3 == 2 else "prepare"
        cases.append(Case("model", i, f"{mutation}-{command}", _model_case(mutation, command)))
    return cases


# kind: artifacts -> train / export-inference ----------------------------------------------------------

GENERIC_FILE = ["bit_flip", "truncate", "empty", "deleted", "directory", "symlink_secret"]
MANIFEST_MUTATIONS = [
    "json_top",
    "json_input",
    "json_layers",
    "json_files",
    "json_bn_stats",
    "files_hostile",
    "files_symlink",
    "json_types",
]
NPZ_MUTATIONS = ["npz_dtype", "npz_shape", "npz_nan", "npz_missing", "npz_extra", "npz_object", "npz_truncated_zip"]
HOSTILE_FILES = ["../x", "/etc/passwd", "../secret", "../secret.npz", "sub/../../secret.npz", "", ".", "manifest.json", "/dev/zero", "link"]


def _artifact_plan() -> list[tuple[str, str]]:
    """(file, mutation) pairs, interleaved so that any prefix covers every file."""
    per_file = {
        "manifest.json": [*MANIFEST_MUTATIONS, *GENERIC_FILE],
        "parameters.npz": [*NPZ_MUTATIONS, *GENERIC_FILE],
        "checkpoint": GENERIC_FILE,
        **{f: [*GENERIC_FILE[:2], "init_dims", "dtype", "raw_short", "huge_shape", "ext_abs", "ext_parent", "ext_symlink", "op_renamed", *GENERIC_FILE[2:]] for f in ONNX_FILES},
    }  # fmt: skip
    plan, depth = [], 0
    while any(depth < len(v) for v in per_file.values()):
        plan.extend((f, v[depth]) for f, v in per_file.items() if depth < len(v))
        depth += 1
    return plan


ARTIFACT_PLAN = _artifact_plan()


def _command_for(file: str, index: int) -> str:
    """ORT-training's own files go to the ort-training backend (portable never reads them), the portable
    ones to portable; the shared ones rotate over portable, ort-training and export-inference."""
    if file in ("training_model.onnx", "optimizer_model.onnx", "checkpoint"):
        return ["train-ort", "train-ort", "export-ort"][index % 3]
    if file in ("portable_training_model.onnx",):
        return "train-portable"
    if file == "parameters.npz":
        return ["train-portable", "export-portable"][index % 2]
    return ["train-portable", "train-ort", "export-portable", "export-ort"][index % 4]


def _mutate_manifest(path: Path, mutation: str, ctx: Ctx) -> str:
    rng = ctx.rng
    data = json.loads(path.read_text())
    if mutation == "json_top":
        what = _mutate_json(data, rng, ())
        if rng.random() < 0.5:
            # keep the structure, hit one of the fields a loader trusts
            key = _pick(
                rng,
                [
                    "num_classes",
                    "neurons",
                    "selectable_params",
                    "bn_momentum",
                    "weight_decay",
                    "optimizer",
                    "source_model",
                    "version",
                    "format",
                ],
            )
            data[str(key)] = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
            what = f"{key}={data[str(key)]!r}"
    elif mutation == "json_input":
        what = _mutate_json(data, rng, ("input",))
    elif mutation == "json_layers":
        what = _mutate_json(data, rng, ("layers", int(rng.integers(len(data["layers"])))))
    elif mutation == "json_files":
        what = _mutate_json(data, rng, ("files",))
    elif mutation == "json_bn_stats":
        what = _mutate_json(data, rng, ("bn_stats",))
    elif mutation in ("files_hostile", "files_symlink"):
        key = str(_pick(rng, sorted(data["files"])))
        if mutation == "files_symlink":
            target = ctx.case / ("secret.npz" if key == "parameters" else "secret")
            (path.parent / "link").symlink_to(os.path.relpath(target, path.parent))
            value = "link"
        else:
            value = HOSTILE_FILES[int(rng.integers(len(HOSTILE_FILES)))]
            if value == "link":
                (path.parent / "link").symlink_to("../secret.npz")
            if value == "/etc/passwd" and rng.random() < 0.5:
                value = str(ctx.case / ("secret.npz" if key == "parameters" else "secret"))
        data["files"][key] = value
        what = f"files.{key}={value!r}"
    else:  # json_types: the whole document or a section of the wrong type
        section = _pick(rng, ["", "input", "layers", "files", "bn_stats", "frozen_params"])
        value = [None, "x", 3, [1, 2], {"a": 1}][int(rng.integers(5))]
        if section:
            data[str(section)] = value
        else:
            data = value
        what = f"{section or 'document'} -> {value!r}"
    path.write_text(json.dumps(data, indent=1))
    return what


def _mutate_npz(path: Path, mutation: str, ctx: Ctx) -> None:
    rng = ctx.rng
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    key = str(_pick(rng, sorted(arrays)))
    if mutation == "npz_dtype":
        arrays[key] = arrays[key].astype(_pick(rng, [np.float64, np.int64, np.float16, np.uint8, np.bool_, np.complex64, "<U3"]))
    elif mutation == "npz_shape":
        a = arrays[key]
        arrays[key] = _pick(rng, [a.reshape(-1), a[:1], np.zeros((0,), a.dtype), np.zeros((*a.shape, 2), a.dtype), np.float32(1.0)])
    elif mutation == "npz_nan":
        a = arrays[key].astype(np.float32).copy()
        a.reshape(-1)[int(rng.integers(a.size))] = _pick(rng, [np.nan, np.inf, -np.inf])
        arrays[key] = a
    elif mutation == "npz_missing":
        del arrays[key]
    elif mutation == "npz_extra":
        arrays["fuzz/extra"] = np.ones(3, np.float32)
        arrays["optimizer/fuzz"] = np.ones(3, np.float32)
    elif mutation == "npz_object":
        arrays[key] = np.array([{"a": 1}, None], dtype=object)
    if mutation == "npz_truncated_zip":
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(22, len(data)))])
        return
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _artifacts_case(file: str, mutation: str, index: int) -> Callable[[Ctx], Invocation]:
    def setup(ctx: Ctx) -> Invocation:
        art = ctx.case / "art"
        shutil.copytree(ctx.bases.artifacts, art)
        shutil.copy(ctx.bases.data, ctx.case / "data.npz")
        path = art / file
        if mutation == "bit_flip":  # few flips in a protobuf, so that some still parse
            path.write_bytes(_bit_flips(path.read_bytes(), ctx.rng, 2 if path.suffix == ".onnx" else 8))
        elif mutation == "truncate":
            path.write_bytes(_truncated(path.read_bytes(), ctx.rng))
        elif mutation in ("empty", "deleted", "directory", "symlink_secret"):
            _replace_with(path, mutation, ctx)
        elif mutation in MANIFEST_MUTATIONS:
            _mutate_manifest(path, mutation, ctx)
        elif mutation in NPZ_MUTATIONS:
            _mutate_npz(path, mutation, ctx)
        else:
            model = onnx.load(str(path), load_external_data=False)
            _mutate_onnx(model, mutation, ctx, art)
            path.write_bytes(model.SerializeToString())
        command = _command_for(file, index)
        if command.startswith("export"):
            out = ctx.case / "exp"
            target = out / "x.onnx"
            args = ["export-inference", str(art), "-o", str(target), *(["--backend", "portable"] if command == "export-portable" else [])]
            return Invocation(args, out, "export", target)
        out = ctx.case / "run"
        backend = "portable" if command == "train-portable" else "ort-training"
        args = ["train", str(art), "--data", f"npz:{ctx.case / 'data.npz'}", "--out", str(out), *TRAIN, "--backend", backend]
        return Invocation(args, out, "train")

    return setup


def artifacts_cases(seed: int, n: int) -> list[Case]:
    cases = []
    for i in range(n):
        file, mutation = ARTIFACT_PLAN[i % len(ARTIFACT_PLAN)]
        label = f"{file.split('.')[0]}-{mutation}-{_command_for(file, i)}"
        cases.append(Case("artifacts", i, label, _artifacts_case(file, mutation, i)))
    return cases


# kind: data -> train ----------------------------------------------------------------------------------


def _data_mutation(name: str, a: dict[str, np.ndarray], rng) -> dict[str, np.ndarray] | bytes | None:
    """Arrays (or raw file bytes) of the mutated .npz; None: the file is handled by the caller."""
    x, n = a["x_train"], len(a["x_train"])
    if name == "x_float255":
        a["x_train"] = x.astype(np.float32)
    elif name == "x_float01":
        a["x_train"] = x.astype(np.float64) / 255
    elif name == "x_int_over":
        a["x_train"] = x.astype(np.int64) * int(rng.integers(2, 1000))
    elif name == "x_bool":
        a["x_train"] = x > 128
    elif name == "x_complex":
        a["x_train"] = x.astype(np.complex64)
    elif name == "x_string":
        a["x_train"] = x.astype("<U3")
    elif name == "x_float16":
        a["x_test"] = a["x_test"].astype(np.float16)
    elif name == "x_datetime":
        a["x_train"] = x.astype("datetime64[s]")
    elif name == "x_nan":
        f = x.astype(np.float32)
        f.reshape(-1)[int(rng.integers(f.size))] = _pick(rng, [np.nan, np.inf, -np.inf])
        a["x_train"] = f
    elif name == "x_negative":
        a["x_train"] = x.astype(np.float32) - 300
    elif name == "x_shape":
        shapes = [(n, 8, 8), (n, 3, 8, 8), (n, 8, 8, 5), (n,), (n, 8, 8, 3, 1), (), (n, 1, 1, 3), (n, 2, 40, 3), (n, 8, 8, 2)]
        shape = shapes[int(rng.integers(len(shapes)))]
        a["x_train"] = np.resize(x, shape)
    elif name == "x_zero_size":
        shapes = [(0, 8, 8, 3), (n, 0, 8, 3), (n, 8, 0, 3), (n, 8, 8, 0)]
        which = str(_pick(rng, ["x_train", "x_test"]))
        a[which] = np.zeros(shapes[int(rng.integers(len(shapes)))], np.uint8)
        if a[which].shape[0] == 0:
            a["y_train" if which == "x_train" else "y_test"] = np.zeros(0, np.int64)
    elif name == "x_channels_differ":
        a["x_test"] = a["x_test"][..., :1]
    elif name == "y_huge":
        a["y_train"] = a["y_train"].copy()
        a["y_train"][int(rng.integers(n))] = int(_pick(rng, [2**40, 2**62, 2**31]))
    elif name == "y_negative":
        a["y_test"] = a["y_test"].copy()
        a["y_test"][0] = -int(rng.integers(1, 2**40))
    elif name == "y_fraction":
        a["y_train"] = a["y_train"].astype(np.float64) + 0.5 * (np.arange(n) == 3)
    elif name == "y_nan":
        a["y_train"] = a["y_train"].astype(np.float32)
        a["y_train"][int(rng.integers(n))] = _pick(rng, [np.nan, np.inf])
    elif name == "y_uint64_max":
        a["y_train"] = a["y_train"].astype(np.uint64)
        a["y_train"][0] = np.iinfo(np.uint64).max
    elif name == "y_string":
        a["y_train"] = a["y_train"].astype("<U2")
    elif name == "y_2d":
        a["y_train"] = np.stack([a["y_train"], a["y_train"]], axis=1)
    elif name == "y_length":
        a["y_train"] = a["y_train"][: n - int(rng.integers(1, 5))]
    elif name == "y_one_class":
        a["y_train"], a["y_test"] = np.zeros(n, np.int64), np.zeros(len(a["y_test"]), np.int64)
    elif name == "y_bool":
        a["y_train"], a["y_test"] = a["y_train"] % 2 == 1, a["y_test"] % 2 == 1
    elif name == "y_int8":
        a["y_train"] = a["y_train"].astype(np.int8)
    elif name == "y_other_classes":
        a["y_test"] = a["y_test"] + 5  # classes 5-9 in test only
    elif name == "y_empty":
        a["y_test"], a["x_test"] = np.zeros(0, np.int64), np.zeros((0, 8, 8, 3), np.uint8)
    elif name == "few_images":
        k = int(rng.integers(1, 10))
        a["x_train"], a["y_train"] = x[:k], a["y_train"][:k]
    elif name == "missing_key":
        del a[str(_pick(rng, sorted(a)))]
    elif name == "extra_keys":
        a["x_val"] = x[:3]
        a["notes"] = np.array("hello")
    elif name == "object_array":
        a[str(_pick(rng, sorted(a)))] = np.array([[1, 2], None], dtype=object)
    elif name == "lone_npy":
        buffer = io.BytesIO()
        np.save(buffer, x)
        return buffer.getvalue()
    elif name == "valid_compressed":
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **a)
        return buffer.getvalue()
    else:
        return None
    return a


DATA_MUTATIONS = [
    "x_float255", "x_float01", "x_int_over", "x_bool", "x_complex", "x_string", "x_float16", "x_datetime", "x_nan",
    "x_negative", "x_shape", "x_zero_size", "x_channels_differ", "y_huge", "y_negative", "y_fraction", "y_nan",
    "y_uint64_max", "y_string", "y_2d", "y_length", "y_one_class", "y_bool", "y_int8", "y_other_classes", "y_empty",
    "few_images", "missing_key", "extra_keys", "object_array", "lone_npy", "valid_compressed", "truncated_zip",
    "bit_flip", "zip_member_corrupt", "not_npz", "empty", "directory", "symlink_secret", "missing_file", "dev_null",
]  # fmt: skip


def _data_case(mutation: str, command: str) -> Callable[[Ctx], Invocation]:
    def setup(ctx: Ctx) -> Invocation:
        path = ctx.case / "data.npz"
        spec = f"npz:{path}"
        base = ctx.bases.data.read_bytes()
        if mutation == "truncated_zip":
            path.write_bytes(_truncated(base, ctx.rng))
        elif mutation == "bit_flip":
            path.write_bytes(_bit_flips(base, ctx.rng, 32))
        elif mutation == "zip_member_corrupt":
            with zipfile.ZipFile(io.BytesIO(base)) as z:
                members = {name: z.read(name) for name in z.namelist()}
            victim = str(_pick(ctx.rng, sorted(members)))
            members[victim] = members[victim][: int(ctx.rng.integers(0, 200))]
            with zipfile.ZipFile(path, "w") as z:
                for name, content in members.items():
                    z.writestr(name, content)
        elif mutation == "not_npz":
            path.write_bytes(_pick(ctx.rng, [b"x_train,y_train\n1,2\n", b"\x93NUMPY\x01\x00junk", b"PK\x05\x06" + bytes(18)]))
        elif mutation in ("empty", "directory", "symlink_secret"):
            _replace_with(path, mutation, ctx)
        elif mutation == "missing_file":
            spec = "npz:" + str(_pick(ctx.rng, ["does-not-exist.npz", "", "victim/../nope.npz"]))
        elif mutation == "dev_null":
            spec = "npz:" + str(_pick(ctx.rng, ["/dev/null", "/dev/zero", "/proc/self/status"]))
        else:
            with np.load(ctx.bases.data) as z:
                arrays = {k: z[k] for k in z.files}
            mutated = _data_mutation(mutation, arrays, ctx.rng)
            if isinstance(mutated, bytes):
                path.write_bytes(mutated)
            else:
                np.savez(path, **mutated)
        if command == "eval":
            (ctx.case / "model.onnx").write_bytes(ctx.bases.model)
            return Invocation(["eval", str(ctx.case / "model.onnx"), "--data", spec], ctx.case / "_writes_nothing", "eval")
        out = ctx.case / "run"
        art = ctx.case / "art"
        shutil.copytree(ctx.bases.artifacts, art)
        return Invocation(["train", str(art), "--data", spec, "--out", str(out), *TRAIN, "--backend", "portable"], out, "train")

    return setup


def data_cases(seed: int, n: int) -> list[Case]:
    """Every second round of the mutations runs `eval MODEL --data` instead of `train`."""
    cases = []
    for i in range(n):
        mutation = DATA_MUTATIONS[i % len(DATA_MUTATIONS)]
        command = "eval" if (i // len(DATA_MUTATIONS)) % 2 == 1 else "train"
        cases.append(Case("data", i, f"{mutation}-{command}", _data_case(mutation, command)))
    return cases


# kind: settings.json -> train --resume --------------------------------------------------------------

SETTING_VALUES = {
    "velocity_images": [0, -1, "10", None, 1.5],
    "lr": [-1, 0, float("nan"), float("inf"), "abc", None],
    "epochs": [0, -1, "3", 2.5, None, True, [2]],
    "batch_size": [0, 1, -8, 10**6, "8", 8.0],
    "seed": [-1, "abc", 2**70, 1.5, None],
    "mu": [float("nan"), "x", None],
    "eps": [-1, float("nan"), "x"],
    "val_fraction": [0, 1, float("nan"), 2, -0.5],
    "eval_batch_size": [0, -1, "256", 1.5],
    "warmup_epochs": [-1, float("nan"), "5", None],
    "selector": ["nope", None, 3],
    "init": ["nope", 3],
    "backend": ["nope", 3, None],
    "bn_update": ["x", None],
    "cost": ["x", 3],
    "phi": ["x", None],
    "rank_cost": ["x", None],
    "recurrence": ["x", None],
    "probe_batches": [0, -1, "2"],
    "gradnorm_pool": [-1, "x"],
    "classes": ["0-4", [0, 99], [-1], [], [0.5], "abc"],
    "train_limit": [0, 1, -5, "x"],
    "budget": [-1, "x", 1e30, 2**70],
    "budget_ratio": [-1, float("nan"), 5, "x"],
    "compute_budget": ["abc", -1, "1e999M"],
    "memory_budget": ["abc", "-5KB"],
    "su_scheme": ["/etc/passwd", "../secret", "7", "abc"],
    "memory_pattern": ["yes", 2],
    "backfill": ["no", 5],
}
SETTINGS_MUTATIONS = [
    "config_value", "config_value", "config_value", "config_value", "config_unknown_key", "config_removed_key",
    "top_unknown_key", "top_removed_key", "top_types", "artifacts_path", "data_path", "out_path", "fingerprint",
    "bit_flip", "truncate", "invalid_utf8", "deep_nesting", "empty", "directory", "symlink_secret", "nan_literals",
]  # fmt: skip


def _localize(run: Path, case: Path) -> dict:
    """The template run's settings with its paths moved into the case folder."""
    settings = json.loads((run / "settings.json").read_text())
    settings["config"]["artifacts"] = settings["artifacts"]["path"] = str(case / "art")
    settings["config"]["data"] = f"npz:{case / 'data.npz'}"
    settings["config"]["out"] = str(case / "run")
    return settings


def _settings_case(mutation: str, index: int) -> Callable[[Ctx], Invocation]:
    def setup(ctx: Ctx) -> Invocation:
        names = sorted(ctx.bases.runs)
        template = ctx.bases.runs[names[index % len(names)]]
        for name in ("art", "run"):
            shutil.copytree(template / name, ctx.case / name, symlinks=True)
        shutil.copy(template / "data.npz", ctx.case / "data.npz")
        (ctx.case / "run" / ".lock").unlink(missing_ok=True)
        run = ctx.case / "run"
        path = run / "settings.json"
        settings = _localize(template / "run", ctx.case)
        text = None
        rng = ctx.rng
        config = settings["config"]
        if mutation == "config_value":
            key = str(_pick(rng, sorted(SETTING_VALUES)))
            values = SETTING_VALUES[key]
            config[key] = values[int(rng.integers(len(values)))]
        elif mutation == "config_unknown_key":
            config["fuzz_option"] = 1
        elif mutation == "config_removed_key":
            del config[str(_pick(rng, sorted(config)))]
        elif mutation == "top_unknown_key":
            settings["fuzz"] = {"a": [1, 2]}
        elif mutation == "top_removed_key":
            del settings[str(_pick(rng, sorted(settings)))]
        elif mutation == "top_types":
            key = str(_pick(rng, ["config", "artifacts", "budget", "data", "model", ""]))
            value = [None, "x", 3, [1, 2], True][int(rng.integers(5))]
            if key:
                settings[key] = value
            else:
                settings = value
        elif mutation == "artifacts_path":
            other = ctx.case / "other_art"
            shutil.copytree(ctx.bases.artifacts, other)
            choices = [str(ctx.case / "secret"), "../secret", "/etc", str(other), str(ctx.case / "nope"), str(ctx.case / "victim"), ""]
            value = choices[int(rng.integers(len(choices)))]
            where = _pick(rng, ["config", "both"])
            config["artifacts"] = value
            if where == "both":
                settings["artifacts"]["path"] = value
        elif mutation == "data_path":
            config["data"] = str(
                _pick(
                    rng,
                    [
                        f"npz:{ctx.case / 'secret'}",
                        "npz:../secret",
                        "npz:" + str(ctx.case / "secret.npz"),
                        "digits",
                        "npz:",
                        "cifar10:/etc",
                        "nope:x",
                    ],
                )
            )
        elif mutation == "out_path":
            config["out"] = str(_pick(rng, [str(ctx.case / "victim"), "../victim", "/", "", str(ctx.case / "secret")]))
        elif mutation == "fingerprint":
            settings["artifacts"]["fingerprint"] = _pick(rng, ["0" * 64, "", None, 3, "../secret"])
        elif mutation == "nan_literals":
            for key in ("lr", "mu", "eps"):
                config[key] = float("nan")
        if mutation == "bit_flip":
            text = _bit_flips(json.dumps(settings, indent=1).encode(), rng, 4)
        elif mutation == "truncate":
            text = _truncated(json.dumps(settings, indent=1).encode(), rng)
        elif mutation == "invalid_utf8":
            text = json.dumps(settings, indent=1).encode().replace(b'"seed"', b'"se\xff\xfed"')
        elif mutation == "deep_nesting":
            text = b'{"config": ' + b"[" * 200000 + b"]" * 200000 + b"}"
        if mutation in ("empty", "directory", "symlink_secret"):
            _replace_with(path, mutation, ctx)
        else:
            path.write_bytes(text if text is not None else json.dumps(settings, indent=1).encode())
        return Invocation(["train", "--out", str(run), "--resume", "--threads", "1"], run, "resume")

    return setup


def settings_cases(seed: int, n: int) -> list[Case]:
    cases = []
    for i in range(n):
        mutation = SETTINGS_MUTATIONS[i % len(SETTINGS_MUTATIONS)]
        cases.append(Case("settings", i, mutation, _settings_case(mutation, i)))
    return cases


# kind: Sparse Update scheme -> train --selector su --su-scheme FILE -------------------------------------

SCHEME = {"layers": {"0": 1.0, "dw": 0.5, "2": 0.25}}
SU_MUTATIONS = [
    "ratio_abc", "ratio_nan", "ratio_inf", "ratio_negative", "ratio_two", "ratio_null", "ratio_list", "ratio_bigint",
    "ratio_numeric_string", "key_unknown", "key_out_of_range", "key_negative", "key_superscript", "key_float", "key_empty",
    "layers_missing", "layers_empty", "layers_list", "top_list", "top_scalar", "nested_junk", "deep_nesting",
    "yaml_python_object", "yaml_python_name", "yaml_alias_bomb", "yaml_invalid", "yaml_duplicate_keys", "yaml_timestamp",
    "yaml_bool_key", "bit_flip", "truncate", "empty", "invalid_utf8", "bom", "huge_file", "directory", "symlink_secret",
    "missing_file", "other_suffix", "all_zero", "valid",
]  # fmt: skip
RATIOS = {
    "ratio_abc": "abc", "ratio_nan": float("nan"), "ratio_inf": float("inf"), "ratio_negative": -1, "ratio_two": 2,
    "ratio_null": None, "ratio_list": [0.5], "ratio_numeric_string": "0.5",
}  # fmt: skip
KEYS = {
    "key_unknown": "nope",
    "key_out_of_range": "99",
    "key_negative": "-1",
    "key_superscript": "\u00b2",
    "key_float": "1.5",
    "key_empty": "",
}


def _su_text(mutation: str, rng, yaml_format: bool) -> tuple[str, bytes]:
    """(file suffix, content) of the mutated scheme."""
    import yaml

    scheme = json.loads(json.dumps(SCHEME))
    layers = scheme["layers"]
    key = str(_pick(rng, sorted(layers)))
    raw = None
    if mutation in RATIOS:
        layers[key] = RATIOS[mutation]
    elif mutation == "ratio_bigint":
        raw = json.dumps(scheme).replace("0.25", "1" + "0" * 400)
    elif mutation in KEYS:
        layers[KEYS[mutation]] = 0.5
    elif mutation == "layers_missing":
        scheme = {"layer": layers}
    elif mutation == "layers_empty":
        scheme["layers"] = {}
    elif mutation == "layers_list":
        scheme["layers"] = [1.0, 0.5]
    elif mutation == "top_list":
        scheme = [scheme]
    elif mutation == "top_scalar":
        scheme = [None, 3, "layers", True][int(rng.integers(4))]
    elif mutation == "nested_junk":
        layers[key] = {"a": [1, {"b": None}], "ratio": 0.5}
    elif mutation == "deep_nesting":
        raw = '{"layers": {"0": ' + "[" * 100000 + "]" * 100000 + "}}"
    elif mutation == "all_zero":
        scheme["layers"] = {k: 0.0 for k in layers}
    elif mutation == "ratio_bigint":
        pass
    if mutation.startswith("yaml_"):
        yaml_format = True
        raw = {
            "yaml_python_object": 'layers: !!python/object/apply:os.system ["touch victim/pwned"]\n',
            "yaml_python_name": "layers:\n  0: !!python/name:os.system\n",
            "yaml_alias_bomb": "a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
            "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nlayers:\n  0: *d\n",
            "yaml_invalid": "layers:\n\t0: [1.0\n  - : :\n",
            "yaml_duplicate_keys": "layers:\n  0: 0.5\n  0: 2\nlayers: {dw: 0.5}\n",
            "yaml_timestamp": "layers:\n  0: 2001-12-14\n",
            "yaml_bool_key": "layers:\n  yes: 0.5\n  null: 0.5\n",
        }[mutation]
    if raw is None:
        raw = yaml.safe_dump(scheme) if yaml_format else json.dumps(scheme, indent=1)
    return (".yaml" if yaml_format else ".json"), raw.encode()


def _su_case(mutation: str) -> Callable[[Ctx], Invocation]:
    def setup(ctx: Ctx) -> Invocation:
        rng = ctx.rng
        suffix, content = _su_text(mutation, rng, bool(rng.random() < 0.4))
        path = ctx.case / f"scheme{suffix}"
        spec = str(path)
        if mutation == "bit_flip":
            content = _bit_flips(json.dumps(SCHEME).encode(), rng, 3)
        elif mutation == "truncate":
            content = _truncated(json.dumps(SCHEME).encode(), rng)
        elif mutation == "empty":
            content = b""
        elif mutation == "invalid_utf8":
            content = json.dumps(SCHEME).encode().replace(b'"dw"', b'"d\xff\xfe"')
        elif mutation == "bom":
            content = b"\xef\xbb\xbf" + json.dumps(SCHEME).encode()
        elif mutation == "huge_file":
            if rng.random() < 0.5:
                content = b" " * (8 << 20) + json.dumps(SCHEME).encode()
            else:
                junk = {f"x{i}": 0.5 for i in range(300_000)}
                content = json.dumps({"layers": {**junk, **SCHEME["layers"]}}).encode()
        elif mutation == "other_suffix":
            path = ctx.case / str(_pick(rng, ["scheme.txt", "scheme", "scheme.JSON", "scheme.yml"]))
            spec = str(path)
        path.write_bytes(content)
        if mutation in ("directory", "symlink_secret"):
            _replace_with(path, mutation, ctx)
        elif mutation == "missing_file":
            path.unlink()
            spec = str(_pick(rng, [str(path), "victim/../nope.json", "6", "0", "-1", ""]))
        shutil.copytree(ctx.bases.artifacts, ctx.case / "art")
        shutil.copy(ctx.bases.data, ctx.case / "data.npz")
        out = ctx.case / "run"
        args = ["train", str(ctx.case / "art"), "--data", f"npz:{ctx.case / 'data.npz'}", "--out", str(out), *TRAIN]
        args += ["--backend", "portable", "--selector", "su", "--su-scheme", spec]
        return Invocation(args, out, "train")

    return setup


def su_cases(seed: int, n: int) -> list[Case]:
    return [Case("su-scheme", i, SU_MUTATIONS[i % len(SU_MUTATIONS)], _su_case(SU_MUTATIONS[i % len(SU_MUTATIONS)])) for i in range(n)]


GENERATORS = {"model": model_cases, "artifacts": artifacts_cases, "data": data_cases, "settings": settings_cases, "su-scheme": su_cases}


# the tests -------------------------------------------------------------------------------------------


def _fuzz(kind: str, n: int, seed: int, bases: Bases, root: Path, capsys, record_property) -> None:
    cases = GENERATORS[kind](seed, n)
    cache = root / "_cache"
    started = time.monotonic()
    outcomes = [_run_case(case, root, bases, cache, seed) for case in cases]
    COUNTS[kind] = COUNTS.get(kind, 0) + len(outcomes)
    failed = [o for o in outcomes if o.problems]
    exits = Counter(o.exit for o in outcomes)
    record_property(f"fuzz_cases_{kind}", len(outcomes))
    record_property(f"fuzz_failures_{kind}", len(failed))
    with capsys.disabled():
        print(
            f"\nfuzz {kind}: {len(outcomes)} cases (seed {seed}) in {time.monotonic() - started:.0f}s, exits "
            + ", ".join(f"{k}: {v}" for k, v in sorted(exits.items(), key=lambda kv: str(kv[0])))
            + f", {len(failed)} failing"
        )
        if os.environ.get("FUZZ_VERBOSE"):
            for o in outcomes:
                print(f"  {o.case.id}: exit {o.exit}{' FAIL' if o.problems else ''}: {o.first_line()[:160]}")
    if failed:
        lines = [f"{len(failed)} of {len(outcomes)} {kind} cases fail (case folders kept under {root}):"]
        for o in failed:
            lines.append(f"  {o.case.id}: exit {o.exit}: {'; '.join(o.problems)}")
            lines.append(f"      stderr: {o.first_line()}")
            lines.append(f"      repro: cd {root / o.case.id} && onnx-neq --debug {' '.join(o.args)}")
        pytest.fail("\n".join(lines), pytrace=False)


@pytest.mark.parametrize("kind", list(DEFAULT_COUNTS))
def test_fuzz(kind, bases, tmp_path, capsys, record_property):
    _fuzz(kind, DEFAULT_COUNTS[kind], SEED, bases, tmp_path, capsys, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DEFAULT_COUNTS))
def test_fuzz_many_seeds(kind, bases, tmp_path, capsys, record_property):
    """FUZZ_SLOW_CASES cases per kind on another seed (FUZZ_SEED + 1)."""
    _fuzz(kind, SLOW_CASES, SEED + 1, bases, tmp_path, capsys, record_property)
