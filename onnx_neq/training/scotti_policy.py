"""SCoTTi's loop policy: velocity each epoch (as SelectorPolicy measures it), an update rule every step.

The rule (selection/scotti.py) takes over the backend's update (backends/update_rules.py): every step it
learns the learning rate, momentum and threshold from the step's gradients and freezes the channels whose
|velocity| falls below the threshold. This policy hands it each epoch's velocity (none in the warm-up
epoch: every channel trains), keeps the backend's masks on the channels the next step needs, and writes
what the rule learned:

    RUN/hyper.csv    per iteration: epoch, iteration, lr, momentum, eps, frozen share, recomputed (1: the
                     threshold fell during the step and its gradients were computed again for the wider masks)

metrics.csv's flops_saved is the mean over the epoch's steps of 1 - backward MACs of the step's update /
those of full backpropagation; lr is the learned rate after the epoch's last step.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from onnx_neq.backends.update_rules import attach_rule
from onnx_neq.manifest import Manifest
from onnx_neq.selection.scotti import HYPER, Scotti, ScottiSettings
from onnx_neq.training import metrics
from onnx_neq.training.config import TrainConfig
from onnx_neq.training.files import atomic_write_bytes
from onnx_neq.training.loop import Step, TrainingLoop
from onnx_neq.training.run_dir import RunDir
from onnx_neq.training.selector_policy import SelectorPolicy, backward_count
from onnx_neq.training.setup import Selection

RULE_PREFIX = "scotti/"  # the rule's state among the policy's saved arrays
MASK_PREFIX = "mask/"
HYPER_FILE = "hyper.csv"
HYPER_COLUMNS = ("epoch", "iteration", *HYPER, "frozen_share", "recomputed")


class ScottiPolicy(SelectorPolicy):
    def __init__(self, config: TrainConfig, manifest: Manifest, selection: Selection):
        super().__init__(config, manifest, selection)
        c = config
        self.rule = Scotti(ScottiSettings(c.lr, c.momentum, c.eps, c.hyper_lr, c.eps_hyper_lr, c.weight_decay))
        self.rows: list[dict[str, Any]] = []
        self.step_macs: list[int] = []

    def start(self, loop: TrainingLoop, saved: dict[str, np.ndarray]) -> None:
        super().start(loop, saved)
        self.count = self.count or backward_count(self.config, self.manifest)
        attach_rule(loop.session, self.rule)
        self._recomputed = loop.session.recomputed
        rule = {k[len(RULE_PREFIX) :]: v for k, v in saved.items() if k.startswith(RULE_PREFIX)}
        if rule:
            self.rule.load_state_dict(rule)
            self.rule.masks = {k[len(MASK_PREFIX) :]: v.astype(bool) for k, v in saved.items() if k.startswith(MASK_PREFIX)}

    def before_epoch(self, epoch: int) -> np.ndarray:
        """The channels whose gradients the epoch's first step needs: those the last update trained (the
        hyper-gradients read them) and those the new velocity trains at the current threshold."""
        previous = self.rule.masks
        warmup = epoch == 0
        velocity = None if warmup else np.split(self.velocity.velocity, np.cumsum(self.loop.layer_sizes)[:-1])
        self.rule.set_velocity(None if velocity is None else dict(zip(self.loop.layer_names, velocity)))
        upcoming = self.rule.freeze_masks()
        self.selection_seconds, self.probe_seconds = 0.0, 0.0
        self.step_macs = []
        return np.concatenate([previous[name] | upcoming[name] for name in self.loop.layer_names])

    def after_step(self, step: Step) -> None:
        session = self.loop.session
        recomputed = session.recomputed
        masks = np.concatenate([self.rule.masks[name] for name in self.loop.layer_names])
        trained = np.concatenate([self.loop.masks[name] != 0 for name in self.loop.layer_names])
        if not np.array_equal(masks, trained):
            self.loop.apply(masks)
        self.step_macs.append(self.count.macs(self.rule.masks))
        step.lr = self.rule.lr
        values = self.rule.values
        self.rows.append(
            {
                "epoch": step.epoch,
                "iteration": step.iteration,
                **{k: f"{values[k]:.9g}" for k in HYPER},
                "frozen_share": f"{self.rule.frozen_share():.6f}",
                "recomputed": recomputed - self._recomputed,
            }
        )
        self._recomputed = recomputed

    def after_epoch(self, epoch: int, selected: np.ndarray) -> dict[str, Any]:
        trained = np.concatenate([self.rule.masks[name] for name in self.loop.layer_names])
        columns = super().after_epoch(epoch, trained)
        full = self.count.full
        columns[metrics.FLOPS_SAVED] = 1.0 - float(np.mean(self.step_macs)) / full if full and self.step_macs else 0.0
        return columns

    def save(self, run: RunDir, epoch: int) -> None:
        super().save(run, epoch)
        rows = [r for r in read_hyper(run) if int(r["epoch"]) < epoch] + self.rows
        out = io.StringIO()
        writer = csv.DictWriter(out, HYPER_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(run.path / HYPER_FILE, out.getvalue().encode())
        self.rows = []

    def state(self) -> dict[str, np.ndarray]:
        state = super().state()
        state.update({RULE_PREFIX + k: v for k, v in self.rule.state_dict().items()})
        state.update({MASK_PREFIX + k: v.astype(np.uint8) for k, v in self.rule.masks.items()})
        return state


def read_hyper(run: RunDir) -> list[dict[str, str]]:
    """The rows of RUN/hyper.csv (none when absent); rows that are not ours are skipped."""
    path = run.path / HYPER_FILE
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and _numbers(r)]


def _numbers(row: dict[str, str]) -> bool:
    try:
        return all(np.isfinite(float(row[k])) for k in HYPER_COLUMNS)
    except (TypeError, ValueError):
        return False
