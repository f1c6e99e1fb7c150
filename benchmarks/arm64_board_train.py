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

    from onnx_neq.data import load_dataset

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
        "status": status if isinstance(status, int) or status is None else str(status),
        "wall_s": round(wall, 2),
    }
    with open(info_file, "w") as f:
        json.dump(info, f, indent=1)
    code = 0 if status in (0, None) else (status if isinstance(status, int) else 1)
    return code


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
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
