"""Helper of `benchmarks/arm64_board.sh train`: the same portable-backend training run on the host and on the board.

python arm64_board_train.py data FILE.npz [TEST_IMAGES]   (host)  export scikit-learn's digits as an .npz
                                                          (x_train, y_train, x_test, y_test; uint8 N x 8 x 8 x 1,
                                                          int64 labels), keeping the first TEST_IMAGES test
                                                          images (0 or absent: all 450); the board has no sklearn
python arm64_board_train.py run INFO.json ARGS...         (both)  `python -m onnx_neq.cli ARGS...` in this process,
                                                          then INFO.json: machine, python, onnxruntime, numpy,
                                                          onnx versions, exit status and wall seconds
python arm64_board_train.py compare WORK [RTOL] [TOP1_ATOL]
                                                          (host)  WORK/{host,board}run/metrics.csv and
                                                          WORK/{host,board}_info.json: per-epoch train_loss within
                                                          RTOL (relative, default 1e-4), train/val/test top-1
                                                          within TOP1_ATOL (default 0: equal); side-by-side table,
                                                          PASS (exit 0) or FAIL (exit 1)
python arm64_board_train.py artifacts WORK                (host)  `prepare-train`: WORK/{host,board}art (each side's
                                                          `onnx-neq prepare`) and WORK/{host,board}_prepare.json:
                                                          portable_training_model.onnx and eval_model.onnx
                                                          byte-identical (eval_model.onnx: but for the order of its
                                                          inputs, which the host's onnxruntime-training sets), or
                                                          else the same graph (node count, op types in order, node
                                                          inputs/outputs, graph inputs as a set and outputs,
                                                          initializer names and shapes); parameters.npz and
                                                          manifest.json (the host's extra onnxruntime-training files
                                                          aside) equal; PASS (exit 0) or FAIL (exit 1)
"""

from __future__ import annotations

import csv
import json
import os
import platform
import runpy
import sys
import time
import traceback

RTOL = 1e-4
TOP1_ATOL = 0.0


def data(file: str, test_images: int = 0) -> None:
    import numpy as np

    from onnx_neq.data.datasets import load_dataset

    d = load_dataset("digits")
    x_test, y_test = d.test.images, d.test.labels
    if test_images > 0:
        x_test, y_test = x_test[:test_images], y_test[:test_images]
    np.savez(file, x_train=d.train.images, y_train=d.train.labels, x_test=x_test, y_test=y_test)
    print(f"digits -> {file}: {len(d.train.labels)} train, {len(y_test)} test images {tuple(d.train.images.shape[1:])} uint8")


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"? ({type(exc).__name__})"


def run(info_file: str, args: list[str]) -> int:
    t0 = time.perf_counter()
    status: int | str | None = 0
    sys.argv = ["onnx_neq.cli", *args]
    try:
        runpy.run_module("onnx_neq.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = exc.code
    except Exception:  # e.g. an ImportError while importing onnx_neq: report it, still write INFO.json
        traceback.print_exc()
        status = 1
    wall = time.perf_counter() - t0
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except Exception as exc:  # noqa: BLE001
        ort_version = f"? ({type(exc).__name__}: {exc})"

    info = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort_version,
        "onnxruntime_package": _ort_package(),
        "numpy": _version("numpy"),
        "onnx": _version("onnx"),
        "onnx_ir": _version("onnx-ir"),
        "onnx_neq": _module_dir("onnx_neq"),
        "status": status if isinstance(status, int) or status is None else str(status),
        "wall_s": round(wall, 2),
    }
    with open(info_file, "w") as f:
        json.dump(info, f, indent=1)
    code = 0 if status in (0, None) else (status if isinstance(status, int) else 1)
    return code


def _module_dir(name: str) -> str:
    """Where `name` was imported from (the tree under test), or '' when it was not imported."""
    module = sys.modules.get(name)
    return os.path.dirname(getattr(module, "__file__", "") or "") if module else ""


def _ort_package() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return "?"


def _read(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _rel(h: float, b: float) -> float:
    return abs(b - h) / max(abs(h), 1e-30)


def compare(work: str, rtol: float = RTOL, top1_atol: float = TOP1_ATOL) -> int:
    infos = {}
    for side in ("host", "board"):
        with open(os.path.join(work, f"{side}_info.json")) as f:
            infos[side] = json.load(f)
    bi = infos["board"]
    ok = True
    for side, info in infos.items():
        print(
            f"{side:5s}: machine={info['machine']} python={info['python']} onnxruntime={info['onnxruntime']} "
            f"({info['onnxruntime_package']}) numpy={info['numpy']} onnx={info['onnx']} "
            f"train wall={info['wall_s']:.1f} s (in-process) status={info['status']}"
        )
        if info["status"] not in (0, None):
            print(f"{side}: the training run failed (exit status {info['status']})")
            ok = False
    if bi["machine"] != "aarch64":
        print(f"board platform.machine() = {bi['machine']!r}, expected 'aarch64'")
        ok = False
    paths = {side: os.path.join(work, f"{side}run", "metrics.csv") for side in ("host", "board")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        print(f"missing {', '.join(missing)}")
        print("FAIL")
        return 1
    host, board = _read(paths["host"]), _read(paths["board"])
    if len(host) != len(board):
        print(f"host has {len(host)} epochs in metrics.csv, board {len(board)}")
        ok = False

    print()
    print(f"per epoch, host | board (train loss: relative difference <= {rtol:g}; top-1: |difference| <= {top1_atol:g})")
    head = (
        f"{'epoch':>5}  {'train_loss host':>15} {'board':>9} {'rel diff':>8}  "
        f"{'train top1 h|b':>15}  {'val top1 h|b':>15}  {'test top1 h|b':>15}  {'selected h|b':>13}  {'epoch s h|b':>13}  ok"
    )
    print(head)
    print("-" * len(head))
    worst = 0.0
    for h, b in zip(host, board):
        hl, bl = float(h["train_loss"]), float(b["train_loss"])
        rel = _rel(hl, bl)
        worst = max(worst, rel)
        good = h["epoch"] == b["epoch"] and rel <= rtol
        cells = []
        for key in ("train_top1", "val_top1", "test_top1"):
            hv, bv = float(h[key]), float(b[key])
            good &= abs(hv - bv) <= top1_atol + 1e-12
            cells.append(f"{hv:.4f}|{bv:.4f}")
        sel = f"{h['selected_neurons']}|{b['selected_neurons']}"  # informational: the velocity selection
        secs = f"{float(h['epoch_seconds']):.1f}|{float(b['epoch_seconds']):.1f}"
        ok &= good
        print(
            f"{h['epoch']:>5}  {hl:>15.6g} {bl:>9.6g} {rel:>8.1e}  {cells[0]:>15}  {cells[1]:>15}  {cells[2]:>15}  "
            f"{sel:>13}  {secs:>13}  {'yes' if good else 'NO'}"
        )
    print()
    print(f"max train-loss relative difference: {worst:.2e} (tolerance {rtol:g})")
    print(f"velocity selection: {_compare_masks(work)} (informational)")
    _compare_models(work)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _compare_masks(work: str) -> str:
    """The per-epoch neuron masks (masks/epoch_NNN.npz) of both runs, entry by entry."""
    try:
        import numpy as np

        names = sorted(os.listdir(os.path.join(work, "hostrun", "masks")))
        same = 0
        for name in names:
            with np.load(os.path.join(work, "hostrun", "masks", name)) as h, np.load(os.path.join(work, "boardrun", "masks", name)) as b:
                same += h.files == b.files and all(np.array_equal(h[k], b[k]) for k in h.files)
        return f"masks identical in {same}/{len(names)} epochs"
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"masks not compared ({type(exc).__name__}: {exc})"


def _compare_models(work: str) -> None:
    """Informational: the best-val model.onnx of both runs, weight by weight.

    Not a criterion: float differences between onnxruntime builds grow over the SGD steps. In the
    default run a 1e-7 relative perturbation of the initial parameters, on the host alone, moves the
    trained weights as far (~1.5% of the update's norm, up to ~7% of a small bias) as the board does,
    with the same epoch-1 loss (2.18119 instead of 2.18112)."""
    try:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        def weights(side: str) -> dict:
            m = onnx.load(os.path.join(work, f"{side}run", "model.onnx"))
            return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}

        h, b = weights("host"), weights("board")
        if h.keys() != b.keys():
            print(f"final model.onnx: initializer names differ ({len(h)} host, {len(b)} board)")
            return
        worst, name = 0.0, ""
        for k, hv in h.items():
            if not np.issubdtype(hv.dtype, np.floating):
                continue
            rel = float(np.max(np.abs(b[k].astype(np.float64) - hv)) / max(float(np.max(np.abs(hv))), 1e-30)) if hv.size else 0.0
            if rel > worst:
                worst, name = rel, k
        print(
            f"final model.onnx ({len(h)} initializers): max |board-host|/max|host| = {worst:.2e}{f' ({name})' if name else ''} (informational)"
        )
    except Exception as exc:  # noqa: BLE001 - informational only
        print(f"final model.onnx: not compared ({type(exc).__name__}: {exc})")


# The files `onnx-neq prepare` writes with stock onnxruntime; the host's onnxruntime-training adds its own.
PORTABLE_FILES = ("portable_training_model.onnx", "eval_model.onnx", "parameters.npz", "manifest.json")
ORT_TRAINING_FILES = {"training_model", "optimizer_model", "checkpoint"}


def artifacts(work: str) -> int:
    """`prepare-train`: the artifacts the host and the board prepared, file by file."""
    infos = {}
    for side in ("host", "board"):
        with open(os.path.join(work, f"{side}_prepare.json")) as f:
            infos[side] = json.load(f)
    ok = True
    for side, info in infos.items():
        print(
            f"{side:5s}: machine={info['machine']} python={info['python']} onnxruntime={info['onnxruntime']} "
            f"({info['onnxruntime_package']}) numpy={info['numpy']} onnx={info['onnx']} onnx-ir={info.get('onnx_ir', '?')} "
            f"prepare wall={info['wall_s']:.1f} s (in-process) status={info['status']}"
        )
        if info["status"] not in (0, None):
            print(f"{side}: prepare failed (exit status {info['status']})")
            ok = False
    if infos["board"]["machine"] != "aarch64":
        print(f"board platform.machine() = {infos['board']['machine']!r}, expected 'aarch64'")
        ok = False
    if "training" in infos["board"]["onnxruntime_package"]:
        print(f"board has {infos['board']['onnxruntime_package']}: it must prepare with stock onnxruntime")
        ok = False
    sources = {infos[s].get("onnx_neq", "") for s in infos}
    print(f"onnx_neq imported from: {' | '.join(sorted(sources))}{'' if len(sources) == 1 else ' (DIFFERENT trees)'}")
    ok &= len(sources) == 1
    dirs = {side: os.path.join(work, f"{side}art") for side in ("host", "board")}
    for side, d in dirs.items():
        present = sorted(os.listdir(d)) if os.path.isdir(d) else []
        print(f"{side} artifacts: {', '.join(present) or '(none)'}")
        missing = [f for f in PORTABLE_FILES if f not in present]
        if missing:
            print(f"{side}: prepare wrote no {', '.join(missing)}")
            ok = False
    if not ok:
        print("FAIL")
        return 1
    print()
    print(f"{'file':30s} {'host bytes':>11} {'board bytes':>11}  result")
    for name in PORTABLE_FILES:
        h, b = (os.path.join(dirs[s], name) for s in ("host", "board"))
        with open(h, "rb") as fh, open(b, "rb") as fb:
            same_bytes = fh.read() == fb.read()
        if same_bytes:
            good, detail = True, "byte-identical"
        elif name.endswith(".onnx"):
            good, detail = _same_graph(h, b)
        elif name.endswith(".npz"):
            good, detail = _same_npz(h, b)
        else:
            good, detail = _same_manifest(h, b)
        ok &= good
        print(f"{name:30s} {os.path.getsize(h):>11,} {os.path.getsize(b):>11,}  {'' if good else 'NO: '}{detail}")
    print()
    print("artifacts: " + ("the same" if ok else "DIFFERENT"))
    return 0 if ok else 1


def _same_graph(host: str, board: str) -> tuple[bool, str]:
    """Not byte-identical: the same graph? (structure must agree; differing initializer values are reported)"""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    h, b = onnx.load(host), onnx.load(board)
    hn, bn = h.graph.node, b.graph.node
    if len(hn) != len(bn):
        return False, f"{len(hn)} nodes on the host, {len(bn)} on the board"
    for i, (x, y) in enumerate(zip(hn, bn)):
        if (x.op_type, x.domain, list(x.input), list(x.output)) != (y.op_type, y.domain, list(y.input), list(y.output)):
            return False, f"node {i} differs: host {x.op_type} {x.name!r}, board {y.op_type} {y.name!r}"
    if [v.name for v in h.graph.output] != [v.name for v in b.graph.output]:
        return False, "graph outputs differ"
    h_inputs, b_inputs = [v.name for v in h.graph.input], [v.name for v in b.graph.input]
    if sorted(h_inputs) != sorted(b_inputs):
        return False, "graph inputs differ"
    if h_inputs != b_inputs:
        # The host's onnxruntime-training puts eval_model.onnx's inputs in its own order (onnx_neq.graph.artifacts.
        # _match_input_order); the portable backends feed by name. In the board's order, the same bytes?
        order = {name: i for i, name in enumerate(b_inputs)}
        inputs = sorted(h.graph.input, key=lambda v: order[v.name])
        copies = [onnx.ValueInfoProto() for _ in inputs]
        for copy, v in zip(copies, inputs):
            copy.CopyFrom(v)
        del h.graph.input[:]
        h.graph.input.extend(copies)
        if h.SerializeToString() == b.SerializeToString():
            return True, "byte-identical but for the order of the inputs (the host's is onnxruntime-training's)"
    hi = {t.name: numpy_helper.to_array(t) for t in h.graph.initializer}
    bi = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    if hi.keys() != bi.keys() or any(hi[k].shape != bi[k].shape or hi[k].dtype != bi[k].dtype for k in hi):
        return False, "initializer names, shapes or dtypes differ"
    values = sum(not np.array_equal(hi[k], bi[k]) for k in hi)
    attrs = sum(list(x.attribute) != list(y.attribute) for x, y in zip(hn, bn))
    meta = "" if (h.opset_import, h.ir_version) == (b.opset_import, b.ir_version) else "; opset/IR version differ"
    return (
        True,
        f"same graph ({len(hn)} nodes, {len(hi)} initializers), not byte-identical: {values} initializer values and {attrs} node attribute lists differ{meta}",
    )


def _same_npz(host: str, board: str) -> tuple[bool, str]:
    import numpy as np

    with np.load(host) as h, np.load(board) as b:
        if sorted(h.files) != sorted(b.files):
            return False, "array names differ"
        differ = [k for k in h.files if h[k].shape != b[k].shape or h[k].dtype != b[k].dtype or not np.array_equal(h[k], b[k])]
        if differ:
            return False, f"{len(differ)} of {len(h.files)} arrays differ (e.g. {differ[0]})"
        return True, f"all {len(h.files)} arrays equal (the .npz bytes differ: zip timestamps)"


def _same_manifest(host: str, board: str) -> tuple[bool, str]:
    with open(host) as fh, open(board) as fb:
        h, b = json.load(fh), json.load(fb)
    extra = sorted(k for k in h.get("files", {}) if k not in b.get("files", {}))
    h["files"] = {k: v for k, v in h.get("files", {}).items() if k not in ORT_TRAINING_FILES}
    if h == b:
        return True, f"equal but for the host's onnxruntime-training files ({', '.join(extra) or 'none'})"
    keys = sorted(k for k in set(h) | set(b) if h.get(k) != b.get(k))
    return False, f"differs in {', '.join(keys)}"


def main() -> int:
    argv = sys.argv[1:]
    mode = argv[0] if argv else ""
    if mode == "data" and len(argv) in (2, 3):
        data(argv[1], int(argv[2]) if len(argv) == 3 else 0)
        return 0
    if mode == "run" and len(argv) >= 2:
        return run(argv[1], argv[2:])
    if mode == "compare" and len(argv) in (2, 3, 4):
        return compare(argv[1], float(argv[2]) if len(argv) > 2 else RTOL, float(argv[3]) if len(argv) > 3 else TOP1_ATOL)
    if mode == "artifacts" and len(argv) == 2:
        return artifacts(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
