"""Smoke test for benchmarks/arm64_board.sh: the same ONNX model on the host and on the emulated board.

    python arm64_board_check.py host DIR      (host)  build model.onnx + inputs.npz in DIR, run them
                                                      on the host's onnxruntime -> host_outputs.npz
    python arm64_board_check.py board DIR     (board) run them on the board's onnxruntime -> board_outputs.npz
                                                      (needs numpy and onnxruntime only)
    python arm64_board_check.py compare DIR   (host)  compare the two; PASS (exit 0) or FAIL (exit 1)

The model: Conv(3->8, 3x3, pad 1, stride 1) + Relu -> ConvTranspose(8->4, 3x3, stride 2) -> Flatten -> MatMul -> Add,
i.e. the forward shapes of the conv, deconv and dense layers onnx-neq trains.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import numpy as np

RTOL = 1e-5  # max |board - host| / max |host|, per output


def build(d: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)  # ConvTranspose: (C_in, C_out, kh, kw)
    b2 = (rng.standard_normal(4) * 0.1).astype(np.float32)
    flat = 4 * 17 * 17  # (8 - 1) * 2 + 3 = 17
    w3 = (rng.standard_normal((flat, 10)) * 0.05).astype(np.float32)
    b3 = (rng.standard_normal(10) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3")]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "w2", "b2"], ["deconv"], strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["deconv"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "w3"], ["m"]),
        helper.make_node("Add", ["m", "b3"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "arm64_board_check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [
            helper.make_tensor_value_info("deconv", TensorProto.FLOAT, [2, 4, 17, 17]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 10]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="arm64_board_check")
    model.ir_version = 8  # old enough for any onnxruntime on either side
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(d, "model.onnx"))
    np.savez(os.path.join(d, "inputs.npz"), x=x)


def run(d: str, session_factory, tag: str) -> None:
    inputs = dict(np.load(os.path.join(d, "inputs.npz")))
    sess = session_factory(os.path.join(d, "model.onnx"))
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, inputs)))
    np.savez(os.path.join(d, f"{tag}_outputs.npz"), **outs)


def host(d: str) -> None:
    build(d)
    # onnx_neq.ort_runtime imports onnxruntime(-training) without pulling in torch
    from onnx_neq.ort_runtime import inference_session, onnxruntime

    run(d, inference_session, "host")
    record(d, "host", onnxruntime().__version__)


def board(d: str) -> None:
    import onnxruntime as ort  # stock onnxruntime; no onnx, no onnx_neq needed here

    def factory(path):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    run(d, factory, "board")
    record(d, "board", ort.__version__)


def record(d: str, side: str, onnxruntime_version: str) -> None:
    """Write <side>_info.json (machine, versions) and print it."""
    info = {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": onnxruntime_version, "numpy": np.__version__}
    with open(os.path.join(d, f"{side}_info.json"), "w") as f:
        json.dump(info, f)
    print(f"{side:<5}: machine={info['machine']} python={info['python']} onnxruntime={info['onnxruntime']} numpy={info['numpy']}")


def compare(d: str) -> int:
    with open(os.path.join(d, "board_info.json")) as f:
        binfo = json.load(f)
    ok = binfo["machine"] == "aarch64"
    print(f"board platform.machine() = {binfo['machine']!r} ({'ok' if ok else 'expected aarch64'})")
    h, b = np.load(os.path.join(d, "host_outputs.npz")), np.load(os.path.join(d, "board_outputs.npz"))
    np.set_printoptions(precision=6, suppress=True, linewidth=140)
    for name in h.files:
        hv, bv = h[name], b[name]
        if hv.shape != bv.shape:
            print(f"{name}: shape host {hv.shape} != board {bv.shape}")
            ok = False
            continue
        rel = float(np.max(np.abs(bv - hv)) / max(float(np.max(np.abs(hv))), 1e-30))
        good = rel <= RTOL
        ok &= good
        print(f"{name} {hv.shape}: max|board-host|/max|host| = {rel:.2e} ({'<=' if good else '>'} {RTOL:g})")
        print(f"  host : {hv.ravel()[:10]}")
        print(f"  board: {bv.ravel()[:10]}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("host", "board", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, d = sys.argv[1], sys.argv[2]
    if mode == "host":
        host(d)
    elif mode == "board":
        board(d)
    else:
        return compare(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
