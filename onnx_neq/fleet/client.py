"""A client's round: fine-tune the global parameters on the client's data with the shared training loop, then
say what to send back.

What travels (`Traveling`, from the manifest and the run's --bn-update):
    rows   each conv's weight and bias, and its BatchNorm's scale and bias under --bn-update selected: they train
           per output channel, so a client sends the rows of the channels it trained (the union of its epochs'
           masks: a channel trained in any epoch of the round has moved)
    whole  the always-trained parameters (the classifier; BatchNorm scale and bias under --bn-update always) and
           the BatchNorm running statistics a training step updates (a model whose BatchNorm runs in train mode):
           they change everywhere in every step, so they travel whole
Everything else (frozen parameters) is in the artifacts every client already holds and never travels.

A client keeps its selector's statistics (velocity, running gradient norms: SelectorPolicy's state) from one
round to the next (`selector_state`), so that a one-epoch round selects from them instead of starting over with
a first-epoch rule. They never leave the client.

The round is a run of `train` into a temporary folder (removed after it) that starts from the global parameters
(`initial_weights`) and trains on the client's shard; the update carries its last epoch's parameters (not the
best validation epoch's: the server averages where the clients got to).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_neq.backends.base import default_backend, open_backend, read_parameters
from onnx_neq.fleet.updates import CHANNELS, DENSE, ChannelUpdate, channel_update, dense_update
from onnx_neq.manifest import Manifest, read_manifest
from onnx_neq.selection.registry import SELECTORS
from onnx_neq.training.config import SELECTED, TrainConfig
from onnx_neq.training.metrics import TEST_TOP1
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.selector_policy import SelectorPolicy
from onnx_neq.training.train import train


@dataclass
class Traveling:
    rows: dict[str, str]  # parameter -> the manifest layer whose channels its rows are
    whole: list[str]

    @property
    def names(self) -> list[str]:
        return [*self.rows, *self.whole]


def traveling(manifest: Manifest, bn_update: str | None) -> Traveling:
    """The parameters a fleet exchanges (see the module docstring)."""
    rows: dict[str, str] = {}
    for layer in manifest.layers:
        own = [layer.weight, *([layer.bias] if layer.bias else [])]
        rows.update({name: layer.name for name in own + (layer.bn if bn_update == SELECTED else [])})
    stats = [name for s in manifest.bn_stats for name in (s["running_mean"], s["running_var"])]
    return Traveling(rows, [n for n in manifest.always_trained if n not in rows] + [n for n in stats if n not in rows])


@dataclass
class LocalResult:
    update: ChannelUpdate
    budget: str  # the run's budget, as train prints it
    updated_params: int  # parameters in the update (whole ones included)
    local_top1: float  # test top-1 of the parameters sent
    selector_state: dict[str, np.ndarray]  # what the next round starts its selector from (empty: nothing to carry)


def local_round(
    config: TrainConfig,
    global_params: dict[str, np.ndarray],
    send: str = CHANNELS,
    workdir: str | None = None,
    selector_state: dict[str, np.ndarray] | None = None,
) -> LocalResult:
    """Train `config` (artifacts, data, shard, recipe; its `out` and `initial_weights` are set here) from
    `global_params` and return what the client sends: the trained channels' rows (`send` channels) or every
    traveling parameter whole (`send` dense). `selector_state`: the last round's LocalResult.selector_state,
    so that a selector with statistics (velocity, gradient norms) keeps them from round to round."""
    with tempfile.TemporaryDirectory(prefix="onnx-neq-round-", dir=workdir) as tmp:
        start = Path(tmp) / "start.ckpt"
        run_config = dataclasses.replace(config, out=str(Path(tmp) / "run"), initial_weights=str(start))
        run_config.validate()  # settles the backend, whose checkpoint format the start weights take
        run_config.backend = run_config.backend or default_backend(run_config.artifacts)
        _write_start(run_config, global_params, start)
        carries = SELECTORS[run_config.selector].policy is None  # SelectorPolicy's state; a policy of its own starts afresh
        policy = (lambda c, m, s: SelectorPolicy(c, m, s, carried=selector_state)) if carries else None  # noqa: E731
        result = train(run_config, policy=policy)
        run = RunDir(result.run_dir)
        settings = run.settings()
        stored = settings["config"]
        travel = traveling(read_manifest(stored["artifacts"]), stored["bn_update"])
        final = read_parameters(stored["backend"], run.path / run.load_state().checkpoint, travel.names)
        examples = int(settings["data"]["train"])
        if send == DENSE:
            update = dense_update(final, travel.names, examples)
        else:
            update = channel_update(final, travel.rows, _trained_channels(run), travel.whole, examples)
        state = _policy_state(run) if carries else {}
        return LocalResult(update, result.budget.describe(), _count(update), float(result.rows[-1][TEST_TOP1]), state)


def _write_start(config: TrainConfig, params: dict[str, np.ndarray], path: Path) -> None:
    """A checkpoint of the artifacts' parameters with `params` put in (the backend's own format)."""
    session = open_backend(config.backend, config.artifacts, threads=config.threads)
    session.set_parameters(params)
    session.save_checkpoint(path)


def _trained_channels(run: RunDir) -> dict[str, np.ndarray]:
    """Per layer, 1 where the channel trained in any epoch of the run."""
    union: dict[str, np.ndarray] = {}
    for path in sorted(run.masks.glob("epoch_*.npz")):
        with np.load(path, allow_pickle=False) as masks:
            for name in masks.files:
                union[name] = np.maximum(union.get(name, 0), masks[name].astype(np.uint8))
    return union


def _policy_state(run: RunDir) -> dict[str, np.ndarray]:
    """The policy's state after the run's last epoch (RUN/state/velocity_NNN.npz)."""
    state = run.load_state()
    with np.load(run.path / state.record(state.epoch).velocity, allow_pickle=False) as saved:
        return {name: saved[name] for name in saved.files}


def _count(update: ChannelUpdate) -> int:
    return int(sum(v.size for _, v in update.rows.values()) + sum(w.size for w in update.whole.values()))
