"""The training loop takes a Policy: its hooks run at their points, a policy can change the learning rate
every iteration and write its own metrics columns, and the default policy (SelectorPolicy) is what
`train` uses when none is given."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_neq.training import metrics
from onnx_neq.training.loop import Policy, Step
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.schedule import learning_rate
from onnx_neq.training.selector_policy import SelectorPolicy
from onnx_neq.training.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("own_cache")


def _config(artifacts, out, **overrides) -> TrainConfig:
    settings = dict(artifacts=str(artifacts), data="digits", classes=[0, 1, 2, 3, 4], out=str(out), epochs=2, batch_size=32)
    settings.update(warmup_epochs=1, threads=1, backend="portable", train_limit=200, **overrides)
    return TrainConfig(**settings)


class HalvedLr(Policy):
    """Every neuron trains; every iteration runs at half the schedule's learning rate; records the hooks."""

    def __init__(self, config, manifest, selection):
        self.calls: list[tuple] = []
        self.lrs: list[float] = []

    def start(self, loop, saved):
        super().start(loop, saved)
        self.calls.append(("start", len(saved)))

    def before_epoch(self, epoch):
        self.calls.append(("before_epoch", epoch))
        return super().before_epoch(epoch)

    def before_step(self, step: Step):
        step.lr /= 2
        self.lrs.append(step.lr)

    def after_step(self, step: Step):
        assert np.isfinite(step.loss) and step.logits.shape == (len(step.labels), 5)
        self.calls.append(("after_step", step.epoch, step.index, step.iteration))

    def after_epoch(self, epoch, selected):
        self.calls.append(("after_epoch", epoch, int(selected.sum())))
        return {metrics.SELECTED_NEURONS: int(selected.sum())}


def test_a_policy_changes_the_learning_rate_every_iteration(tiny_artifacts, tmp_path):
    made = []

    def factory(config, manifest, selection):
        made.append(HalvedLr(config, manifest, selection))
        return made[0]

    result = train(_config(tiny_artifacts, tmp_path / "run"), policy=factory)
    policy, rows = made[0], result.rows
    steps = [c for c in policy.calls if c[0] == "after_step"]
    per_epoch = len(steps) // 2
    assert policy.calls[0] == ("start", 0) and [c for c in policy.calls if c[0] == "before_epoch"] == [
        ("before_epoch", 0),
        ("before_epoch", 1),
    ]
    assert [c[3] for c in steps] == list(range(2 * per_epoch)) and steps[per_epoch][1:3] == (1, 0)
    masks = RunDir(result.run_dir).load_masks(0)
    neurons = sum(len(mask) for mask in masks.values())
    assert all(mask.all() for mask in masks.values())  # the base policy trains every neuron
    assert [c for c in policy.calls if c[0] == "after_epoch"] == [("after_epoch", 0, neurons), ("after_epoch", 1, neurons)]
    schedule = [learning_rate(i, 2 * per_epoch, 0.05, per_epoch) / 2 for i in range(2 * per_epoch)]
    assert policy.lrs == schedule
    assert [float(r[metrics.LR]) for r in rows] == [float(f"{schedule[per_epoch - 1]:.6g}"), float(f"{schedule[-1]:.6g}")]
    assert [int(r[metrics.SELECTED_NEURONS]) for r in rows] == [neurons, neurons]
    assert rows[0][metrics.UPDATED_PARAMS] == "" and rows[0][metrics.BUDGET] == ""  # the selector's columns: not this policy's
    assert (result.run_dir / "model.onnx").exists()


def test_the_default_policy_is_the_selector_policy(tiny_artifacts, tmp_path):
    plain = train(_config(tiny_artifacts, tmp_path / "plain", selector="random", budget_ratio=0.3))
    explicit = train(_config(tiny_artifacts, tmp_path / "explicit", selector="random", budget_ratio=0.3), policy=SelectorPolicy)
    untimed = [[{k: v for k, v in r.items() if k not in metrics.TIMING} for r in result.rows] for result in (plain, explicit)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2


def test_metrics_rows_name_only_columns():
    with pytest.raises(KeyError, match="metrics.py"):
        metrics.metrics_row({metrics.EPOCH: 0, "sparsity": 0.5})
    row = metrics.metrics_row({metrics.LR: 0.0123456789, metrics.EPOCH: 3, metrics.COST_MACS: ""})
    assert list(row) == [metrics.EPOCH, metrics.LR, metrics.COST_MACS] and row[metrics.LR] == "0.0123457" and row[metrics.COST_MACS] == ""
