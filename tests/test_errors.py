"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import onnx_model
from onnx import TensorProto, helper, numpy_helper
from support import cli


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _model(nodes, initializers, out_dim=5, in_shape=("N", 3, 8, 8)) -> onnx.ModelProto:
    return onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(a, n) for n, a in initializers.items()],
    )


def _conv_then(op: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv0"),
        helper.make_node(op, ["c"], ["a"], name="act0"),
        helper.make_node("Conv", ["a", "w2"], ["c2"], name="conv1"),
        helper.make_node(op, ["c2"], ["a2"], name="act1"),
        helper.make_node("GlobalAveragePool", ["a2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
    ]
    inits = {
        "w": rng.standard_normal((4, 3, 3, 3), np.float32),
        "w2": rng.standard_normal((4, 4, 1, 1), np.float32),
        "g": rng.standard_normal((5, 4), np.float32),
    }
    return _model(nodes, inits)


def test_missing_file(tmp_path):
    _assert_one_line_error(cli("prepare", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "a")), "nope.onnx", "no such file")


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    _assert_one_line_error(cli("prepare", str(path), "-o", str(tmp_path / "a")), "not a readable ONNX model")


def test_truncated_file(tiny_onnx, tmp_path):
    data = tiny_onnx[0].read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    result = cli("prepare", str(path), "-o", str(tmp_path / "a"))
    _assert_one_line_error(result, "truncated.onnx")
    assert not (tmp_path / "a").exists()


def test_model_without_conv(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    path = _save(_model(nodes, {"g": rng.standard_normal((5, 192), np.float32)}), tmp_path / "mlp.onnx")
    _assert_one_line_error(cli("prepare", str(path), "-o", str(tmp_path / "a")), "no Conv")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("op", ["Sign", "Round"])
def test_op_without_gradient_names_nodes_and_op(op, tmp_path):
    path = _save(_conv_then(op), tmp_path / "nograd.onnx")
    result = cli("prepare", str(path), "-o", str(tmp_path / "a"))
    _assert_one_line_error(result, op, "'act0'", "'act1'", "no gradient")
    assert not (tmp_path / "a").exists()
    assert not list(tmp_path.glob(".a.partial*"))


def test_every_untrainable_op_is_named(tmp_path):
    """Two different ops without a gradient: one error line names both, with their nodes."""
    model = _conv_then("Sign")
    model.graph.node[3].op_type = "Round"  # act1
    path = _save(model, tmp_path / "two.onnx")
    _assert_one_line_error(cli("prepare", str(path), "-o", str(tmp_path / "a")), "Sign (nodes 'act0')", "Round (nodes 'act1')")


def test_prepare_refuses_to_overwrite_a_foreign_directory(tiny_onnx, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    _assert_one_line_error(cli("prepare", str(tiny_onnx[0]), "-o", str(tmp_path / "mine")), "did not write", "thesis.tex")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_export_bad_weights(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"\x00garbage")
    _assert_one_line_error(cli("export", "resnet18", "-o", str(tmp_path / "m.onnx"), "--weights", str(bad)), "w.pth")
    _assert_one_line_error(
        cli("export", "resnet18", "-o", str(tmp_path / "m.onnx"), "--weights", str(tmp_path / "none.pth")), "does not exist"
    )


def test_export_inference_on_non_artifacts(tmp_path):
    _assert_one_line_error(cli("export-inference", str(tmp_path), "-o", str(tmp_path / "m.onnx")), "manifest.json")
