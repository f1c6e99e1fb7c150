"""onnx-neq train on a tiny model and real data (digits, classes 0-4, 8x8 like the model's input)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from support import cli_command, kill_after_lines

from onnx_neq.backends.base import open_backend
from onnx_neq.backends.ort_training import TrainingSession
from onnx_neq.manifest import read_manifest
from onnx_neq.training import metrics
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.train import TrainConfig, train

TIMING = metrics.TIMING  # wall-clock columns
DIGITS_0_4 = ["--data", "digits", "--classes", "0-4"]  # real data shaped like the tiny model: 8x8, 5 classes


def _config(artifacts, out, **overrides) -> TrainConfig:
    settings = dict(
        artifacts=str(artifacts), data="digits", classes=[0, 1, 2, 3, 4], out=str(out), epochs=3, batch_size=32, warmup_epochs=1, lr=0.05
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _independent_costs(artifacts) -> dict[str, int]:
    """Cost per neuron from the source model's initializer shapes: C_in/groups * kh * kw (+1 bias)."""
    manifest = read_manifest(artifacts)
    model = onnx.load(manifest.source_model)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    costs = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = shapes[node.input[1]]
            costs[node.input[1]] = w[1] * w[2] * w[3] + (1 if len(node.input) > 2 and node.input[2] else 0)
    return {layer.name: costs[layer.weight] for layer in manifest.layers}


@pytest.mark.parametrize("selector", ["velocity", "random", "su", "full", "neq"])
def test_updated_parameters_never_exceed_the_budget(selector, tiny_artifacts, tmp_path):
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps({"layers": {"0": 0.5, "grouped": 1.0}}))
    result = train(
        _config(tiny_artifacts, tmp_path / "run", selector=selector, budget_ratio=0.4 if selector != "su" else None, su_scheme=str(scheme))
    )
    costs = _independent_costs(tiny_artifacts)
    total = sum(costs[l.name] * l.out_channels for l in read_manifest(tiny_artifacts).layers)
    run = RunDir(result.run_dir)
    assert len(result.rows) == 3
    for row in result.rows:
        masks = run.load_masks(int(row["epoch"]))
        counted = sum(int(mask.sum()) * costs[name] for name, mask in masks.items())
        assert counted == int(row["updated_params"])
        if selector in ("velocity", "random"):
            assert counted <= int(row["budget"]) == int(total * 0.4)
        if selector == "su":  # 4 of the stem's 8 channels (cost 3*3*3+1) and all 12 grouped channels (cost 2)
            assert counted == 4 * 28 + 12 * 2 == int(row["budget"])
        if selector == "full":
            assert counted == total


def test_velocity_chain_matches_an_independent_computation(tiny_artifacts, tmp_path):
    """velocity[e] follows the authors' recurrence over the recorded phi; masks[e+1] are the greedy
    choice by |velocity|/cost under the budget, recomputed here."""
    result = train(_config(tiny_artifacts, tmp_path / "run", epochs=4, budget_ratio=0.35))
    run = RunDir(result.run_dir)
    manifest = read_manifest(tiny_artifacts)
    costs = np.concatenate([np.full(l.out_channels, c) for l, c in zip(manifest.layers, _independent_costs(tiny_artifacts).values())])
    prev_phi, s = np.zeros(len(costs)), np.zeros(len(costs))
    for epoch in range(4):
        with np.load(run.velocity / f"epoch_{epoch:03d}.npz") as z:
            phi, velocity = z["phi"], z["velocity"]
        d = prev_phi - phi
        r = s + d
        s = 0.5 * r - d
        prev_phi = phi
        np.testing.assert_allclose(velocity, r, rtol=1e-12)
        if epoch == 3:
            break
        budget = int(result.rows[epoch + 1]["budget"])
        expected, spent = np.zeros(len(costs), bool), 0
        for i in sorted(range(len(costs)), key=lambda i: (-abs(r[i]) / costs[i], i)):
            if spent + costs[i] > budget:
                break
            expected[i], spent = True, spent + costs[i]
        masks = run.load_masks(epoch + 1)
        assert np.array_equal(np.concatenate([masks[l.name] for l in manifest.layers]).astype(bool), expected)


def test_phi_from_real_taps_matches_torch(tiny_artifacts, rng):
    import torch

    from onnx_neq.selection.velocity import layer_phi

    session = TrainingSession(tiny_artifacts)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    before = session.eval_batch(x)[1]
    for _ in range(3):
        session.train_step(x, np.array([0, 1, 2, 3, 4]), 0.2)
    after = session.eval_batch(x)[1]
    names = [l.name for l in session.manifest.layers]
    expected = [
        (
            1
            - torch.nn.functional.cosine_similarity(
                torch.from_numpy(after[n]).double().flatten(2), torch.from_numpy(before[n]).double().flatten(2), dim=2
            )
        )
        .mean(0)
        .numpy()
        for n in names
    ]
    np.testing.assert_allclose(layer_phi(after, before, names), np.concatenate(expected), rtol=1e-9, atol=1e-12)


def test_random_selection_reproducible_for_a_seed(tiny_artifacts, tmp_path):
    runs = [train(_config(tiny_artifacts, tmp_path / f"r{i}", selector="random", seed=seed, epochs=2)) for i, seed in enumerate((3, 3, 4))]
    masks = [RunDir(r.run_dir).load_masks(1) for r in runs]
    assert all(np.array_equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert not all(np.array_equal(masks[0][k], masks[2][k]) for k in masks[0])


def _same_run(a: RunDir, b: RunDir, artifacts, backend: str = "ort-training") -> None:
    rows_a, rows_b = a.metrics(), b.metrics()
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows_a] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in rows_b
    ]
    state_a, state_b = a.load_state(), b.load_state()
    params_a = open_backend(backend, artifacts, a.path / state_a.checkpoint).parameters()
    params_b = open_backend(backend, artifacts, b.path / state_b.checkpoint).parameters()
    assert params_a.keys() == params_b.keys()
    assert all(np.array_equal(params_a[k], params_b[k]) for k in params_a)
    assert (a.path / "model.onnx").read_bytes() == (b.path / "model.onnx").read_bytes()


def _interrupt_at(epoch: int, step: int):
    """A progress callback that stops the run as Ctrl-C would, at training step `step` of `epoch`."""

    def interrupt(event, info):
        if event == "step" and info["epoch"] == epoch and info["step"] == step:
            raise KeyboardInterrupt

    return interrupt


@pytest.mark.parametrize("selector", ["velocity", "gradnorm"])  # gradnorm: the running norms resume too
def test_interrupted_then_resumed_equals_uninterrupted(selector, tiny_artifacts, tmp_path):
    config = dict(epochs=4, selector=selector, budget_ratio=0.4)
    train(_config(tiny_artifacts, tmp_path / "straight", **config))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_artifacts, tmp_path / "resumed", **config), progress=_interrupt_at(2, 5))
    assert len(RunDir(tmp_path / "resumed").metrics()) == 2
    train(_config(tiny_artifacts, tmp_path / "resumed", **config), resume=True)
    _same_run(RunDir(tmp_path / "straight"), RunDir(tmp_path / "resumed"), tiny_artifacts)


@pytest.mark.parametrize("backend", ["portable", "specialized"])
def test_memory_pattern_changes_memory_not_results(backend, tiny_artifacts, tmp_path):
    """--memory-pattern only plans ORT's buffers: the same run, bit for bit; a resume may switch it."""
    config = dict(epochs=3, backend=backend, budget_ratio=0.4)
    train(_config(tiny_artifacts, tmp_path / "lean", **config))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_artifacts, tmp_path / "pattern", memory_pattern=True, **config), progress=_interrupt_at(1, 3))
    train(_config(tiny_artifacts, tmp_path / "pattern", **config), resume=True, overrides={"memory_pattern": False})
    _same_run(RunDir(tmp_path / "lean"), RunDir(tmp_path / "pattern"), tiny_artifacts, backend)


@pytest.mark.parametrize("backend", [pytest.param("ort-training", marks=pytest.mark.reference), "portable"])
def test_killed_process_resumes_to_the_same_result(backend, tiny_artifacts, tmp_path):
    """SIGKILL the real command after 3 of its 30 epochs (an epoch is most of the time, so almost
    surely in the middle of one), resume, compare with an uninterrupted run."""
    args = [
        "train",
        str(tiny_artifacts),
        *DIGITS_0_4,
        "--epochs",
        "30",
        "--batch-size",
        "4",
        "--warmup-epochs",
        "1",
        "--backend",
        backend,
    ]
    subprocess.run(cli_command(*args, "--out", str(tmp_path / "straight")), check=True, capture_output=True, timeout=600)
    kill_after_lines([*args, "--out", str(tmp_path / "killed")], tmp_path / "killed" / "metrics.csv", 4)
    assert 3 <= len(RunDir(tmp_path / "killed").metrics()) < 30
    resumed = subprocess.run(
        cli_command("train", "--out", str(tmp_path / "killed"), "--resume"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    _same_run(RunDir(tmp_path / "straight"), RunDir(tmp_path / "killed"), tiny_artifacts, backend)


def test_train_command_never_imports_torch(tiny_artifacts, tmp_path):
    code = f"""
import sys, atexit
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch on this board")
sys.meta_path.insert(0, NoTorch())
atexit.register(lambda: print("torch loaded:", "torch" in sys.modules))
sys.argv = ["onnx-neq", "train", {str(tiny_artifacts)!r}, "--data", "digits", "--classes", "0-4", "--epochs", "1", "--out", {str(tmp_path / "run")!r}]
from onnx_neq.cli import main
main()
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch loaded: False" in result.stdout
    assert (tmp_path / "run" / "model.onnx").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--data", "mnist-ish"], "unknown data spec"),
        (["--data", "cifar10:/nonexistent/cifar"], "does not exist"),
        (["--data", "fashion-mnist:/nonexistent/fm"], "does not exist"),
        (["--budget", "1"], "below the cheapest neuron"),
        (["--data", "digits", "--classes", "0-4", "--selector", "su", "--su-scheme", "2"], "MobileNetV2"),
    ],
)
def test_bad_input_is_one_line_and_no_run_dir(args, needle, tiny_artifacts, tmp_path):
    full = ["train", str(tiny_artifacts), "--out", str(tmp_path / "run")] + (
        ["--data", "digits", "--classes", "0-4"] if "--data" not in args and "--classes" not in args else []
    )
    if "--classes" in args and "--data" not in args:
        full += ["--data", "digits"]
    result = subprocess.run(cli_command(*full, *args), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_budget_above_total_warns_and_trains_everything(tiny_artifacts, tmp_path):
    result = subprocess.run(
        cli_command(
            "train",
            str(tiny_artifacts),
            *DIGITS_0_4,
            "--epochs",
            "1",
            "--budget",
            "10000000",
            "--out",
            str(tmp_path / "run"),
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "every neuron trains" in result.stdout
    masks = RunDir(tmp_path / "run").load_masks(0)
    assert all(m.all() for m in masks.values())


def test_eval_command_reproduces_the_best_epochs_test_top1(tiny_artifacts, tmp_path):
    """`onnx-neq eval` runs the exported model.onnx in an inference session; the run measured test
    top-1 with the training session's eval graph. Both must agree for the best validation epoch."""
    result = train(_config(tiny_artifacts, tmp_path / "run", epochs=3))
    expected = float(result.rows[result.best_epoch]["test_top1"])
    out = subprocess.run(cli_command("eval", str(tmp_path / "run"), *DIGITS_0_4), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"top-1 {expected:.4f}" in out.stdout and "test images" in out.stdout


def test_a_run_from_initial_weights_interrupted_before_its_first_epoch_resumes_from_them(tiny_artifacts, tmp_path):
    """Resumed with no epoch committed, a run restarts from its initial weights (prune's rounds), not the artifacts'."""
    start = open_backend("portable", tiny_artifacts)
    start.set_parameters({name: value * 0.5 for name, value in start.parameters().items() if name.endswith(".weight")})
    start.save_checkpoint(tmp_path / "start.ckpt")
    config = dict(epochs=2, backend="portable", selector="full", initial_weights=str(tmp_path / "start.ckpt"))
    train(_config(tiny_artifacts, tmp_path / "straight", **config))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_artifacts, tmp_path / "killed", **config), progress=_interrupt_at(0, 2))
    assert not RunDir(tmp_path / "killed").committed()
    train(_config(tiny_artifacts, tmp_path / "killed", **config), resume=True)
    _same_run(RunDir(tmp_path / "straight"), RunDir(tmp_path / "killed"), tiny_artifacts, "portable")
