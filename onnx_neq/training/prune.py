"""`onnx-neq prune`: rounds of Entropy-Guided (or global magnitude) pruning, fine-tuned between rounds.

    OUT/prune.json          the settings and the model's sha256 (the same command continues; others are refused)
    OUT/artifacts/          the model prepared (a head of the data's classes where it differs)
    OUT/round_RR/masks.npz  the keep-mask of every prunable conv weight for that round
    OUT/round_RR/start.ckpt the weights the round starts from: the last round's, with the pruned ones set to 0
    OUT/round_RR/run/       the round's fine-tuning: a run directory of the shared training loop
    OUT/rounds.csv          one row per finished round; OUT/model.onnx the last round's best model

Round 0 fine-tunes the dense model (the reference). Round r >= 1 measures each prunable layer's entropy
with the last round's final weights (training/entropy.py), prunes `share` of the remaining weights of the
prunable convs (selection/egp.py: per layer by entropy for egp, one global threshold for magnitude),
then fine-tunes for --epochs with those weights held at exactly 0 (training/prune_policy.py). Every file
is written whole or not at all, and a round's run resumes as `train --resume` does, so a prune killed at
any moment ends, run again, where an uninterrupted one ends.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from onnx_neq.backends.base import PORTABLE, SPECIALIZED, open_backend
from onnx_neq.errors import NeqError
from onnx_neq.manifest import Manifest, read_manifest
from onnx_neq.selection import egp
from onnx_neq.selection.registry import FULL
from onnx_neq.training import metrics
from onnx_neq.training.config import TrainConfig
from onnx_neq.training.default_model import artifacts_with_head
from onnx_neq.training.entropy import EntropyProbe, LayerActivity
from onnx_neq.training.evaluate import evaluate
from onnx_neq.training.files import atomic_write_bytes, read_run_json, sha256_file
from onnx_neq.training.loop import Progress
from onnx_neq.training.prune_config import EGP, PruneConfig
from onnx_neq.training.prune_policy import PrunePolicy, read_keep
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.run_lock import RunLock
from onnx_neq.training.setup import load_data, load_run_dataset, prep
from onnx_neq.training.train import TrainResult, train

FOLD_CHECK_IMAGES = 256  # training images on which the folded model must give the pruned model's outputs
FOLD_TOLERANCE = 1e-4  # on the logits: float32 sums in another order (a merged conv) move them by ~1e-6 relative
ROUND_COLUMNS = (
    "round", "target_sparsity", "sparsity", "nonzero", "identity_layers", "constant_layers", "best_epoch", "val_top1", "test_top1",
)  # fmt: skip


@dataclass
class PruneResult:
    out: Path
    rows: list[dict]
    model: Path
    folded: Path | None = None  # model_folded.onnx, where a layer could be removed
    folded_top1: float | None = None  # its test top-1


def prune(config: PruneConfig, progress: Progress | None = None) -> PruneResult:
    """Prune config.model into config.out; the same command continues an interrupted prune."""
    progress = progress or (lambda event, info: None)
    config.selector, config.backend = FULL, config.backend or SPECIALIZED  # prune prepares SGD artifacts
    config.validate()
    if config.backend not in (PORTABLE, SPECIALIZED):
        raise NeqError(f"prune holds pruned weights at 0 in the update on the host; use --backend {SPECIALIZED} or {PORTABLE}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        _check_settings(out, config)
        artifacts = _artifacts(config, out)
        rounds = egp.rounds_for(config.sparsity, config.share)
        rows, measure = _read_rounds(out), _Measure(config, artifacts)
        for r in range(len(rows), rounds + 1):
            progress("round", {"round": r, "rounds": rounds})
            rows.append(_round(config, measure, out, r, progress))
            _write_rounds(out, rows)
        model = out / "model.onnx"
        shutil.copyfile(_round_dir(out, rounds) / "run" / "model.onnx", model)
        folded = _fold(measure, out, rounds)
        folded_top1 = evaluate(folded, config.data, config.classes).top1 if folded else None
        return PruneResult(out, rows, model, folded, folded_top1)


def _check_settings(out: Path, config: PruneConfig) -> None:
    """OUT/prune.json: written by the first run; a later one must ask for the same prune."""
    settings = {"model_sha256": sha256_file(Path(config.model)), "config": _recorded(config)}
    path = out / "prune.json"
    if path.exists():
        stored = read_run_json(path)
        if stored != settings:
            raise NeqError(f"{out} holds a prune with other settings or another model; run the same command, or choose another -o")
        return
    if any(p.name != ".lock" for p in out.iterdir()):
        raise NeqError(f"{out} is not empty and holds no prune; choose another -o")
    atomic_write_bytes(path, json.dumps(settings, indent=1).encode())


def _recorded(config: PruneConfig) -> dict:
    """The settings that decide the result (threads and the output folder do not)."""
    return {k: v for k, v in asdict(config).items() if k not in ("threads", "out", "model")}


def _artifacts(config: PruneConfig, out: Path) -> Path:
    from onnx_neq.graph.prepare import prepare

    artifacts = out / "artifacts"
    if not (artifacts / "manifest.json").exists():
        prepare(config.model, artifacts)
    manifest = read_manifest(artifacts)
    dataset = load_run_dataset(dataclasses.replace(config, artifacts=str(artifacts)), manifest)
    return artifacts_with_head(artifacts, dataset.num_classes)


def _round_dir(out: Path, r: int) -> Path:
    return out / f"round_{r:02d}"


class _Measure:
    """The prune's artifacts, training data and entropy probe, opened once, and the weights and activations of the
    checkpoint measured last: a round's row measures its final weights, the next round's masks reuse them."""

    def __init__(self, config: PruneConfig, artifacts: Path):
        self.config, self.artifacts, self.manifest = config, artifacts, read_manifest(artifacts)
        self.run_config = TrainConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)})
        self.run_config.artifacts = str(artifacts)
        self.data = load_data(self.run_config, self.manifest)
        self.probe: EntropyProbe | None = None
        self.last: tuple[Path, dict, dict] | None = None

    def final(self, folder: Path) -> tuple[dict[str, np.ndarray], dict[str, LayerActivity]]:
        """The parameters of round `folder`'s final checkpoint and its layers' activations on the training data."""
        checkpoint = _final_checkpoint(folder)
        if self.last is None or self.last[0] != checkpoint:
            params = self.session(checkpoint).parameters()
            self.probe = self.probe or EntropyProbe(self.artifacts, self.manifest, params, self.config.threads)
            self.last = (checkpoint, params, self.probe.measure(params, self.data.train, self.config.eval_batch_size))
        return self.last[1], self.last[2]

    def session(self, checkpoint: Path):
        return open_backend(self.config.backend, self.artifacts, checkpoint, threads=self.config.threads)

    def weight(self, layer: str) -> str:
        return next(x.weight for x in self.manifest.layers if x.name == layer)


def _round(config: PruneConfig, measure: _Measure, out: Path, r: int, progress: Progress) -> dict:
    """Round r: its masks and start weights (unless written), its fine-tuning, its row."""
    folder = _round_dir(out, r)
    folder.mkdir(exist_ok=True)
    run_config = dataclasses.replace(measure.run_config, out=str(folder / "run"))
    if r > 0:
        if not (folder / "start.ckpt").exists():
            _start_round(config, measure, out, r)
        run_config.initial_weights = str(folder / "start.ckpt")
    keep = read_keep(folder / "masks.npz") if r > 0 else {}
    policy: Callable = lambda c, m, s: PrunePolicy(c, m, s, keep)  # noqa: E731
    resume = RunDir(run_config.out).exists()
    result = train(run_config, resume=resume, progress=progress, policy=policy)
    return _row(config, measure, folder, r, result)


def _start_round(config: PruneConfig, measure: _Measure, out: Path, r: int) -> None:
    """Round r's masks (from the entropy of round r-1's final weights) and its start weights."""
    params, activity = measure.final(_round_dir(out, r - 1))
    keep = read_keep(_round_dir(out, r - 1) / "masks.npz") if r > 1 else None
    prunable = {measure.weight(name): a for name, a in activity.items()}
    keep = keep or {w: np.ones(params[w].shape, bool) for w in prunable}
    weights = {w: params[w] for w in prunable}
    amount = egp.round_amount(sum(int(k.sum()) for k in keep.values()), config.share)
    if config.method == EGP:
        keep = egp.egp_masks(weights, keep, {w: a.value for w, a in prunable.items()}, amount)
    else:
        keep = egp.magnitude_masks(weights, keep, amount)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **keep)
    atomic_write_bytes(_round_dir(out, r) / "masks.npz", buffer.getvalue())
    session = measure.session(_final_checkpoint(_round_dir(out, r - 1)))
    session.set_parameters({w: np.where(keep[w], params[w], np.float32(0)) for w in keep})
    target = _round_dir(out, r) / "start.ckpt"
    tmp = target.with_name(".start.ckpt.tmp")
    session.save_checkpoint(tmp)
    tmp.replace(target)


def _final_checkpoint(folder: Path) -> Path:
    """The round's weights: those of its best validation epoch (its model.onnx), where the next round starts."""
    run = RunDir(folder / "run")
    best = run.load_state().best_checkpoint
    if best is None:
        raise NeqError(f"{folder} has no finished epoch; run the same command again to continue it")
    return run.path / best


def _row(config: PruneConfig, measure: _Measure, folder: Path, r: int, result: TrainResult) -> dict:
    """The round's line of rounds.csv: sparsity of its masks, the layers its final weights make removable, top-1."""
    params, activity = measure.final(folder)
    weights = {measure.weight(n) for n in activity}
    nonzero = sum(int(np.count_nonzero(params[w])) for w in weights)
    total = sum(params[w].size for w in weights)
    return {
        "round": r,
        "target_sparsity": f"{egp.schedule_sparsity(r, config.share)[-1] if r else 0.0:.6f}",
        "sparsity": f"{1 - nonzero / total:.6f}",
        "nonzero": nonzero,
        "identity_layers": sum(a.identity for a in activity.values()),
        "constant_layers": sum(a.constant or not np.any(params[measure.weight(n)]) for n, a in activity.items()),
        "best_epoch": result.best_epoch,
        "val_top1": metrics.VAL_TOP1.write(result.best_val),
        "test_top1": metrics.TEST_TOP1.write(result.test_at_best_val),
    }


def _fold(measure: _Measure, out: Path, last: int) -> Path | None:
    """OUT/model_folded.onnx: the layers whose activation is the identity or a constant on the training data (or
    whose weights are all 0) folded out of OUT/model.onnx (graph/fold_layers.py), checked against it on those
    images; OUT/fold.json says what was folded, skipped and why. None when no layer could go."""
    import onnx

    params, activity = measure.final(_round_dir(out, last))
    order, identity, constant, off = _removable(measure.manifest, activity, params)
    model = onnx.load(str(out / "model.onnx"))
    images = prep(measure.manifest, measure.data.train.images[:FOLD_CHECK_IMAGES])
    folded, record = _fold_checked(model, order, (identity, constant, off), images)
    if folded is not None:
        onnx.save(folded, str(out / ".model_folded.onnx.tmp"))
        (out / ".model_folded.onnx.tmp").replace(out / "model_folded.onnx")
    atomic_write_bytes(out / "fold.json", json.dumps(record, indent=1).encode())
    return out / "model_folded.onnx" if folded is not None else None


def _removable(manifest: Manifest, activity: dict[str, LayerActivity], params: dict) -> tuple[list[str], set[str], set[str], dict]:
    """(conv weights in layer order, those whose activation is the identity, those whose output is constant, and per
    conv weight its channels whose activation outputs 0 on all the data: ReLU or Clip from 0, input always <= 0)."""
    weights = {layer.name: layer.weight for layer in manifest.layers if layer.name in activity}
    # a residual pair's activation reads the sum with the shortcut: ON or OFF there says nothing of the conv alone
    alone = {n: a for n, a in activity.items() if not a.pairing.residual}
    identity = {weights[n] for n, a in alone.items() if a.identity and np.any(params[weights[n]])}
    constant = {weights[n] for n, a in alone.items() if a.constant} | {w for w in weights.values() if not np.any(params[w])}
    off = {
        weights[n]: a.always_below for n, a in alone.items() if a.pairing.low == 0 and a.always_below is not None and a.always_below.any()
    }
    return [layer.weight for layer in manifest.layers], identity, constant, off


def _fold_checked(model, order: list[str], claims: tuple[set[str], set[str], dict], images: np.ndarray) -> tuple[object, dict]:
    """The model with the layers folded (and OFF channels dropped) whose folding keeps its outputs on `images`: all at
    once where that holds, else one layer at a time in layer order, each kept only if the outputs stay within
    FOLD_TOLERANCE; and the record for fold.json. `claims`: identity layers, constant layers, OFF channels."""
    from onnx_neq.graph.fold_layers import check_equal, fold_layers

    identity, constant, off = claims

    def attempt(ids: set[str], consts: set[str], offs: dict):
        folded, report = fold_layers(model, ids, consts, offs)
        try:
            return folded, report, check_equal(model, folded, images, atol=FOLD_TOLERANCE)
        except NeqError:
            return None, report, None

    refused: dict[str, str] = {}
    folded, report, diff = attempt(identity, constant, off)
    if folded is None:
        ids, consts, offs = set(), set(), {}
        for w in (w for w in order if w in identity | constant | set(off)):
            trial = (ids | ({w} & identity), consts | ({w} & constant), {**offs, **({w: off[w]} if w in off else {})})
            if attempt(*trial)[0] is not None:
                ids, consts, offs = trial
            else:
                refused[w] = "folding it with the layers before it changed the model's outputs on the training images"
        folded, report, diff = attempt(ids, consts, offs)
    record = {"identity": sorted(identity), "constant": sorted(constant), "off_channels": {w: int(m.sum()) for w, m in off.items()}}
    record.update({**asdict(report), "refused": refused, "max_abs_difference": diff})
    smaller = report.nodes_after < report.nodes_before or report.params_after < report.params_before
    return (folded if smaller else None), record


def _read_rounds(out: Path) -> list[dict]:
    path = out / "rounds.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if [r.get("round") for r in rows] != [str(i) for i in range(len(rows))]:
        raise NeqError(f"{path} is not a rounds file this prune wrote; choose another -o")
    return rows


def _write_rounds(out: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, ROUND_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "rounds.csv", text.getvalue().encode())
