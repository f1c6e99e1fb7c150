"""The default Policy: each epoch a registered selector (selection/registry.py) chooses the neurons within
the budget, from the statistics it needs: velocity (conv outputs of the velocity set, compared between
epochs), weight norms (the Sparse Update mask), running gradient norms or Fisher potentials (probe batches).

per epoch:  [probe]  ->  selector(statistics, cost model, budget)  ->  (the loop trains and evaluates)
            ->  taps of the velocity set  ->  phi  ->  velocity  ->  its columns, velocity/epoch_NNN.npz
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from onnx_neq.manifest import Manifest
from onnx_neq.selection.cost_model import CostModel
from onnx_neq.selection.gradient import RunningNorm
from onnx_neq.selection.registry import PROBED, SELECTORS, Needs, SelectionInputs
from onnx_neq.selection.velocity import VelocityState, layer_phi
from onnx_neq.training import metrics
from onnx_neq.training.config import TrainConfig
from onnx_neq.training.loop import PROBE_STREAM, Policy, TrainingLoop, shuffled_batches
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.setup import Selection, prep

GRADNORM_PREFIX = "gradnorm_"  # the running gradient norms, saved beside the velocity buffers


class SelectorPolicy(Policy):
    """Selects with config.selector (config.first_epoch_init at epoch 0 where the selector has a first-epoch rule).

    `carried`: the state() of an earlier run to start from (a fleet client's previous round): its velocity and
    gradient norms, so that epoch 0 already has statistics behind it (no first-epoch rule, norms probed)."""

    def __init__(self, config: TrainConfig, manifest: Manifest, selection: Selection, carried: dict[str, np.ndarray] | None = None):
        self.carried = carried if carried and "velocity" in carried else {}  # a state with at least one epoch behind it
        self.config, self.manifest = config, manifest
        self.models, self.su_mask, self.budget = selection.models, selection.su_mask, selection.budget
        self.model: CostModel = self.models[config.cost_kind]
        self.rank_costs = rank_costs(self.model, manifest, config.rank_cost)
        self.statistics = set(SELECTORS[config.selector].needs)
        self.gradient_probe = _gradient_probe(config) if self.statistics & PROBED else None

    def start(self, loop: TrainingLoop, saved: dict[str, np.ndarray]) -> None:
        super().start(loop, saved)
        saved = saved or self.carried
        c = self.config
        self.velocity = (
            VelocityState.from_arrays(saved, c.mu, c.recurrence) if saved else VelocityState(self.manifest.neurons, c.mu, c.recurrence)
        )
        norms = {k[len(GRADNORM_PREFIX) :]: v for k, v in saved.items() if k.startswith(GRADNORM_PREFIX)}
        self.norms = RunningNorm.from_arrays(norms) if norms else RunningNorm(self.manifest.neurons)
        self.taps = self._taps()  # epoch -1 (pretrained), or the end of the last finished epoch
        self.count = backward_count(self.config, self.manifest) if "compute" in self.models else None

    def before_epoch(self, epoch: int) -> np.ndarray:
        seen = epoch + (1 if self.carried else 0)  # epochs of statistics behind this selection
        fisher, self.probe_seconds = self._probe(seen)
        start = time.perf_counter()
        selected = self.select(seen, fisher)
        self.norms.mark_trained(selected)
        self.selection_seconds = time.perf_counter() - start
        return selected

    def after_epoch(self, epoch: int, selected: np.ndarray) -> dict[str, Any]:
        start = time.perf_counter()
        taps = self._taps()
        self.velocity.update(layer_phi(taps, self.taps, self.loop.layer_names, self.config.phi))
        self.taps = taps
        self.selection_seconds += time.perf_counter() - start
        params = self.models["params"].cost(selected)
        return {
            metrics.UPDATED_PARAMS: params,
            metrics.BUDGET: self.budget.amount,
            metrics.SELECTED_NEURONS: int(selected.sum()),
            metrics.SELECTION_SECONDS: self.selection_seconds,
            metrics.COST_PARAMS: params,
            metrics.COST_MACS: self.models["compute"].cost(selected) if "compute" in self.models else "",
            metrics.COST_BYTES: self.models["memory"].cost(selected) if "memory" in self.models else "",
            metrics.PROBE_SECONDS: self.probe_seconds,
            metrics.FLOPS_SAVED: self.count.saved(self.loop.masks) if self.count else "",
        }

    def save(self, run: RunDir, epoch: int) -> None:
        run.save_velocity(epoch, self.velocity.phi, self.velocity.velocity)

    def state(self) -> dict[str, np.ndarray]:
        return {**self.velocity.to_arrays(), **{GRADNORM_PREFIX + k: v for k, v in self.norms.to_arrays().items()}}

    def select(self, epoch: int, fisher: np.ndarray | None = None) -> np.ndarray:
        """The epoch's selection: bool over every neuron."""
        spec = SELECTORS[self.config.selector]
        if epoch == 0 and spec.first_epoch is not None:
            spec = SELECTORS[self.config.first_epoch_init]
        inputs = SelectionInputs(
            epoch,
            self.model,
            self.budget.amount,
            self.rank_costs,
            np.random.default_rng([self.config.seed, epoch, 1]),
            self.config.backfill,
            self.loop.layer_sizes,
            velocity=self.velocity.velocity,
            su_mask=self.su_mask,
            gradient_norms=self.norms.norm,
            trained_ever=self.norms.trained_ever,
            fisher=fisher,
            options={option: getattr(self.config, option) for option in spec.options},
        )
        return spec.select(inputs)

    def _probe(self, epoch: int) -> tuple[np.ndarray | None, float]:
        """Every channel's gradient statistics on --probe-batches training batches, with the current weights:
        Fisher potentials from epoch 0 (the pretrained model), running gradient norms from epoch 1 (they
        follow training; their selector draws uniformly first)."""
        if not (Needs.FISHER in self.statistics or (Needs.GRADIENT_NORMS in self.statistics and epoch > 0)):
            return None, 0.0
        start, c, train = time.perf_counter(), self.config, self.loop.data.train
        chunks = shuffled_batches(len(train), c.batch_size, c.seed, epoch, PROBE_STREAM)[: c.probe_batches]
        batches = [(prep(self.manifest, train.images[b]), train.labels[b]) for b in chunks]
        stats = self.gradient_probe.measure_batches(self.loop.session.parameters(), batches)
        self.norms.update(stats.grad_norm)
        return stats.fisher, time.perf_counter() - start

    def _taps(self) -> dict[str, np.ndarray]:
        return self.loop.session.eval_batch(self.loop.data.velocity_set)[1]


def rank_costs(model: CostModel, manifest: Manifest, rank_cost: str) -> np.ndarray:
    """What a neuron's |statistic| is divided by in rankings: its cost in the run's unit; with --rank-cost
    authors a depthwise neuron counts `groups` times (C_in * kh * kw weights, as the authors' code ranks it)."""
    if rank_cost == "exact":
        return model.per_neuron.astype(np.float64)
    factor = np.repeat(
        [layer.groups if layer.kind == "depthwise" else 1 for layer in manifest.layers], [layer.out_channels for layer in manifest.layers]
    )
    return model.per_neuron * factor.astype(np.float64)


def backward_count(config: TrainConfig, manifest: Manifest):
    """The backward MACs of a selection, as the specialised backend counts them (graph/specialize.py); for flops_saved."""
    from onnx_neq.graph.specialize import BackwardCount, load_training_graph

    return BackwardCount(load_training_graph(config.artifacts, manifest, "portable_training_model"), manifest, config.bn_update)


def _gradient_probe(config: TrainConfig):
    from onnx_neq.training.gradient_stats import GradientProbe

    return GradientProbe(config.artifacts, threads=config.threads)
