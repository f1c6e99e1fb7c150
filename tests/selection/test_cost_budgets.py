"""Training within compute and memory budgets: every epoch's selection, recounted here from the
source model's graph and the saved masks, stays within the budget, and the run records all three units."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import shape_inference
from support import cli

from onnx_neq.manifest import read_manifest
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.train import TrainConfig, train


def _conv_shapes(artifacts) -> list[dict]:
    """Per conv of the source model, in graph order: weight dims and output H*W, from ONNX shape inference."""
    manifest = read_manifest(artifacts)
    model = onnx.load(manifest.source_model)
    batch_free = model.graph.input[0].type.tensor_type.shape.dim
    batch_free[0].dim_value = 1
    inferred = shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*inferred.graph.value_info, *inferred.graph.output]}
    dims.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.input})
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            w, out, x = weights[node.input[1]], dims[node.output[0]], dims[node.input[0]]
            convs.append({"w": w, "positions": out[2] * out[3], "input": int(np.prod(x[1:]))})
    return convs


def _macs_by_hand(convs, masks) -> int:
    """Weight-gradient MACs of the selected channels + input-gradient MACs of every conv after the shallowest one."""
    selected = [int(m.sum()) for m in masks]
    if not any(selected):
        return 0
    shallowest = min(i for i, n in enumerate(selected) if n)
    per_channel = [c["w"][1] * c["w"][2] * c["w"][3] * c["positions"] for c in convs]
    reach = sum(per_channel[j] * convs[j]["w"][0] for j in range(shallowest + 1, len(convs)))
    return sum(n * p for n, p in zip(selected, per_channel)) + reach


@pytest.mark.parametrize("selector", ["velocity", "random"])
def test_compute_budget_holds_every_epoch(selector, tiny_artifacts, tmp_path):
    convs = _conv_shapes(tiny_artifacts)
    total = sum(c["w"][0] * c["w"][1] * c["w"][2] * c["w"][3] * c["positions"] for c in convs)  # every dW
    total += sum(c["w"][0] * c["w"][1] * c["w"][2] * c["w"][3] * c["positions"] for c in convs[1:])  # every dX but the stem's
    config = TrainConfig(
        artifacts=str(tiny_artifacts), data="digits", classes=[0, 1, 2, 3, 4], out=str(tmp_path / "run"), epochs=3, warmup_epochs=1,
        selector=selector, compute_budget=str(int(0.3 * total)),
    )  # fmt: skip
    result = train(config)
    assert result.budget.total == total and result.budget.unit == "backward MACs per image"
    run = RunDir(result.run_dir)
    names = [layer.name for layer in read_manifest(tiny_artifacts).layers]
    for row in result.rows:
        masks = run.load_masks(int(row["epoch"]))
        counted = _macs_by_hand(convs, [masks[n] for n in names])
        assert counted == int(row["cost_macs"]) <= int(0.3 * total) == int(row["budget"])
        assert int(row["cost_params"]) == int(row["updated_params"]) and int(row["cost_bytes"]) > 0
    assert run.settings()["config"]["backend"] == "specialized" and run.settings()["config"]["bn_update"] == "selected"


def test_memory_budget_from_the_command_line(tiny_artifacts, tmp_path):
    convs = _conv_shapes(tiny_artifacts)
    out = tmp_path / "run"
    args = ["train", str(tiny_artifacts), "--data", "digits", "--classes", "0-4", "--epochs", "2", "--batch-size", "16"]
    result = cli(*args, "--memory-budget", "48KB", "--selector", "random", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "49,152 of" in result.stderr and "bytes" in result.stderr
    manifest = read_manifest(tiny_artifacts)
    run = RunDir(out)
    for row in run.metrics():
        masks = run.load_masks(int(row["epoch"]))
        selected = [int(masks[layer.name].sum()) for layer in manifest.layers]
        shallowest = min(i for i, n in enumerate(selected) if n)
        params = sum(n * (layer.neuron_cost + (2 if layer.bn else 0)) for n, layer in zip(selected, manifest.layers))
        activations = sum(4 * 16 * c["input"] for c in convs[shallowest:])  # float32 inputs of a batch of 16
        assert 4 * params + activations == int(row["cost_bytes"]) <= 48 * 1024  # SGD: gradients only


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--cost", "compute", "--budget", "500"], "another unit"),
        (["--memory-budget", "lots"], "256KB"),
        (["--cost", "memory", "--backend", "portable"], "--backend specialized"),
        (["--compute-budget", "10"], "below the cheapest neuron"),
    ],
)
def test_bad_cost_options_are_one_line(args, needle, tiny_artifacts, tmp_path):
    full = ["train", str(tiny_artifacts), "--data", "digits", "--classes", "0-4", "--out", str(tmp_path / "run"), *args]
    result = cli(*full)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
