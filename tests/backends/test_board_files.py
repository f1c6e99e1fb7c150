"""A board holds four files of the artifacts (docs/boards.md): manifest.json,
portable_training_model.onnx, eval_model.onnx and parameters.npz. The portable and specialised backends
train, resume, export and evaluate from those alone; a run's fingerprint covers the manifest and the files
its backend reads, so another file coming or going does not block a resume, and a changed one does."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnx_neq.cli import main
from onnx_neq.errors import NeqError
from onnx_neq.graph.specialize import channel_inputs, layer_states, specialize
from onnx_neq.manifest import read_manifest
from onnx_neq.ort_runtime import inference_session
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.train import TrainConfig, train

BOARD_FILES = ("manifest.json", "portable_training_model.onnx", "eval_model.onnx", "parameters.npz")
TIMING = {"epoch_seconds", "selection_seconds", "step_ms", "specialize_seconds"}  # wall-clock columns


pytestmark = pytest.mark.usefixtures("own_cache")  # a cache of its own per test


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8x8 RGB images of 5 classes (a class is a brighter quadrant pattern plus noise)."""
    rng = np.random.default_rng(0)

    def split(n):
        y = np.arange(n) % 5
        x = rng.integers(0, 120, (n, 8, 8, 3))
        for c in range(5):
            x[y == c, c : c + 3, :, c % 3] += 120
        return x.astype(np.uint8), y.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = split(80), split(20)
    path = tmp_path_factory.mktemp("data") / "board.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def _board(artifacts: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in BOARD_FILES:
        shutil.copy(artifacts / name, folder / name)
    return folder


def _config(artifacts: Path, data: Path, out: Path, backend: str) -> TrainConfig:
    return TrainConfig(
        artifacts=str(artifacts), data=f"npz:{data}", out=str(out), backend=backend, epochs=2, warmup_epochs=1,
        batch_size=8, threads=1, lr=0.05, budget_ratio=0.3,
    )  # fmt: skip


def _stop_in_epoch(epoch: int):
    def progress(event, info):
        if event == "step" and info["epoch"] == epoch and info["step"] == 2:
            raise KeyboardInterrupt

    return progress


def _interrupted(artifacts: Path, data: Path, out: Path, backend: str) -> RunDir:
    """A run stopped in epoch 1, after epoch 0 was committed."""
    with pytest.raises(KeyboardInterrupt):
        train(_config(artifacts, data, out, backend), progress=_stop_in_epoch(1))
    run = RunDir(out)
    assert [int(r["epoch"]) for r in run.metrics()] == [0]
    return run


def _resume(out: Path):
    return train(TrainConfig(artifacts="", data="", out=str(out)), resume=True)


def _rows(run: RunDir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in run.metrics()]


def _reference_macs(artifacts: Path, run: RunDir, backend: str) -> list[int]:
    """Backward MACs per epoch from ORT's training_model.onnx of the full artifacts folder."""
    from onnx_neq.graph.specialize import full_backward_macs

    manifest = read_manifest(artifacts)
    if backend == "portable":
        return [full_backward_macs(artifacts, manifest, "training_model")] * len(run.metrics())
    training = onnx.load(str(artifacts / "training_model.onnx"))
    bn_update = run.settings()["config"]["bn_update"]
    macs = []
    for row in run.metrics():
        masks = run.load_masks(int(row["epoch"]))
        _, report = specialize(training, manifest, layer_states(manifest, masks), bn_update)
        macs.append(report.backward_macs({name[: -len(".neq_channels")]: len(k) for name, k in channel_inputs(manifest, masks).items()}))
    return macs


@pytest.mark.parametrize("backend", ["portable", "specialized"])
def test_train_resume_export_and_eval_from_the_four_files(backend, tiny_artifacts, data, tmp_path, monkeypatch):
    board = _board(tiny_artifacts, tmp_path / "board")
    straight = tmp_path / "straight"
    train(_config(board, data, straight, backend))
    run = _interrupted(board, data, tmp_path / "run", backend)
    _resume(run.path)
    assert _rows(run) == _rows(RunDir(straight)) and len(_rows(run)) == 2
    assert (run.path / "model.onnx").read_bytes() == (straight / "model.onnx").read_bytes()
    macs = [int(r["backward_macs"]) for r in run.metrics()]
    assert macs == _reference_macs(tiny_artifacts, run, backend) and all(m > 0 for m in macs)
    assert sorted(p.name for p in board.iterdir()) == sorted(BOARD_FILES)  # nothing was added to the artifacts

    # the board has no onnxruntime-training: export-inference defaults to the portable backend there
    monkeypatch.setattr("onnx_neq.backends.base.training_kernels_available", lambda: False)
    best = run.path / run.load_state().best_checkpoint
    exported = tmp_path / "exported.onnx"
    result = CliRunner().invoke(main, ["export-inference", str(board), "-o", str(exported), "--checkpoint", str(best)])
    assert result.exit_code == 0, result.output
    for model in (exported, run.path):
        result = CliRunner().invoke(main, ["eval", str(model), "--data", f"npz:{data}"])
        assert result.exit_code == 0, result.output
        best_test = float(run.metrics_by_epoch()[run.load_state().best_epoch]["test_top1"])
        assert f"top-1 {best_test:.4f}" in result.output


def test_resume_is_refused_when_a_file_it_reads_changed_and_not_when_another_comes(tiny_artifacts, data, tmp_path):
    board = _board(tiny_artifacts, tmp_path / "board")
    run = _interrupted(board, data, tmp_path / "run", "portable")
    for name in BOARD_FILES:
        original = (board / name).read_bytes()
        if name.endswith(".onnx"):
            model = onnx.load(str(board / name))
            model.producer_version = "changed"
            onnx.save(model, str(board / name))
        elif name.endswith(".npz"):
            with np.load(board / name) as z:
                arrays = {k: z[k] for k in z.files}
            arrays["stem.weight"] = arrays["stem.weight"] + np.float32(0.01)
            np.savez(board / name, **arrays)
        else:
            (board / name).write_text(json.dumps(json.loads(original), indent=2))
        with pytest.raises(NeqError, match="changed since"):
            _resume(run.path)
        (board / name).write_bytes(original)
    for name in ("training_model.onnx", "optimizer_model.onnx", "checkpoint"):  # files the portable backend never reads
        shutil.copy(tiny_artifacts / name, board / name)
    _resume(run.path)
    assert [int(r["epoch"]) for r in run.metrics()] == [0, 1]


def test_a_missing_file_is_one_error_naming_it_before_anything_is_written(tiny_artifacts, data, tmp_path):
    board = _board(tiny_artifacts, tmp_path / "board")
    (board / "eval_model.onnx").unlink()
    with pytest.raises(NeqError, match="eval_model.onnx is missing") as error:
        train(_config(board, data, tmp_path / "run", "portable"))
    assert "\n" not in str(error.value)
    assert not RunDir(tmp_path / "run").exists()


@pytest.mark.parametrize("which", ["tiny", "frozen_bn"])
def test_the_graph_from_the_portable_model_specialises_like_orts(which, tiny_artifacts, frozen_bn_artifacts, rng):
    """Every state of every layer, both BatchNorm updates: the same graph outputs, bit for bit, and the same report."""
    from onnx_neq.graph.specialize import training_graph_from_portable

    artifacts = tiny_artifacts if which == "tiny" else frozen_bn_artifacts["sgd"]
    manifest = read_manifest(artifacts)
    ort = onnx.load(str(artifacts / "training_model.onnx"))
    rebuilt = training_graph_from_portable(onnx.load(str(artifacts / "portable_training_model.onnx")), manifest)
    with np.load(artifacts / "parameters.npz") as z:
        params = {k: z[k] for k in z.files}
    x = rng.standard_normal((4, *manifest.input.shape[1:])).astype(np.float32)
    y = rng.integers(0, manifest.num_classes, 4)
    for combo, bn_update in itertools.product(
        itertools.product(("none", "some", "all"), repeat=len(manifest.layers)), ("always", "selected")
    ):
        states = dict(zip([layer.name for layer in manifest.layers], combo))
        masks = {layer.name: _mask(layer.out_channels, states[layer.name]) for layer in manifest.layers}
        feeds = {manifest.input.name: x, manifest.label_input: y, **channel_inputs(manifest, masks), **params}
        (a, report_a), (b, report_b) = (specialize(graph, manifest, states, bn_update) for graph in (ort, rebuilt))
        assert report_a.layers == report_b.layers and report_a.backward_macs() == report_b.backward_macs()
        outputs_a, outputs_b = _outputs(a, feeds), _outputs(b, feeds)
        assert outputs_a.keys() == outputs_b.keys()
        assert all(np.array_equal(outputs_a[k], outputs_b[k]) for k in outputs_a), (states, bn_update)


def test_the_shipped_mobilenet_specialises_from_the_portable_model_like_from_orts(tmp_path_factory, rng):
    """Depthwise, strided and pointwise convs, the im2col and MatMul forms of dW: one mixed selection."""
    from onnx_neq.graph.prepare import prepare
    from onnx_neq.graph.specialize import full_backward_macs, training_graph_from_portable
    from onnx_neq.training.default_model import SHIPPED

    artifacts = tmp_path_factory.mktemp("mobilenet") / "art"
    prepare(SHIPPED, artifacts, num_classes=10)
    manifest = read_manifest(artifacts)
    assert full_backward_macs(artifacts, manifest, "portable_training_model") == full_backward_macs(artifacts, manifest)
    ort = onnx.load(str(artifacts / "training_model.onnx"))
    rebuilt = training_graph_from_portable(onnx.load(str(artifacts / "portable_training_model.onnx")), manifest)
    states = {layer.name: ("some", "none", "all")[i % 3] for i, layer in enumerate(manifest.layers)}
    masks = {layer.name: _mask(layer.out_channels, states[layer.name]) for layer in manifest.layers}
    with np.load(artifacts / "parameters.npz") as z:
        feeds = {k: z[k] for k in z.files}
    feeds.update({manifest.input.name: rng.standard_normal((2, *manifest.input.shape[1:])).astype(np.float32)})
    feeds.update({manifest.label_input: rng.integers(0, 10, 2), **channel_inputs(manifest, masks)})
    (a, report_a), (b, report_b) = (specialize(graph, manifest, states, "selected") for graph in (ort, rebuilt))
    k = {name[: -len(".neq_channels")]: len(v) for name, v in channel_inputs(manifest, masks).items()}
    assert report_a.layers == report_b.layers and report_a.backward_macs(k) == report_b.backward_macs(k)
    outputs_a, outputs_b = _outputs(a, feeds), _outputs(b, feeds)
    assert outputs_a.keys() == outputs_b.keys() and all(np.array_equal(outputs_a[n], outputs_b[n]) for n in outputs_a)


def _mask(channels: int, state: str) -> np.ndarray:
    mask = np.full(channels, 0.0 if state == "none" else 1.0, np.float32)
    if state == "some":
        mask[::2] = 0
    return mask


def _outputs(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = inference_session(model)
    names = {i.name for i in session.get_inputs()}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {k: v for k, v in feeds.items() if k in names})))
