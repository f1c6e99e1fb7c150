"""The settings of a run, each declared once: TrainConfig's fields, with their defaults and, in each
field's metadata, a Setting (its help, range, choices and where the CLI offers it). The click options of
`onnx-neq train` and `onnx-neq compare` are generated from SETTINGS (cli.py), validate() checks against
it, and settings.json stores the fields by name (so a name, once released, stays).

A new setting: one field in TrainConfig, `name: type = setting(default, "help", cli=TRAIN, ...)`; the CLI
option, its --flag (the name with dashes), the range check and settings.json follow. A selector that reads
it lists its name in its registry entry (selection/registry.py, SelectorSpec.options). A command's own
settings (prune's rounds, fleet's clients) go in a subclass, `class PruneConfig(TrainConfig)`, declared the
same way: settings_of(PruneConfig) and cli's _settings_options(where, PruneConfig) cover it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from onnx_neq.backends.base import BACKENDS, ORT_TRAINING, PORTABLE, SPECIALIZED
from onnx_neq.data.shards import parse_shard
from onnx_neq.errors import NeqError
from onnx_neq.selection.budget import DEFAULT_RATIO, BudgetRequest
from onnx_neq.selection.cost_model import KINDS as COST_KINDS
from onnx_neq.selection.registry import FIRST_EPOCH_RULES, RANDOM, RANK_COSTS, SELECTORS, VELOCITY
from onnx_neq.selection.velocity import PHI_MODES, RECURRENCES

TRAIN, RECIPE = "train", "recipe"  # where the CLI offers a setting: `train` only, or train and compare (the recipe)
PRUNE = "prune"  # `prune` only (a PruneConfig setting)
SHARE = "share"  # Setting.budget_of of --budget-ratio: a share of the total, in any unit
MAX_COUNT = 1 << 31  # no count of a run (epochs, batch, seed, images) comes near this
ALWAYS, SELECTED = BN_UPDATES = ("always", "selected")  # --bn-update


@dataclass(frozen=True)
class Setting:
    """One setting as the CLI and the checks see it; name, kind (int, float, str, bool or list) and default
    are filled in from its TrainConfig field."""

    help: str
    cli: str | None = None  # TRAIN, RECIPE, or None: settings.json and the Python API only
    choices: tuple = ()  # the values allowed (None too where the default is None)
    minimum: float | None = None  # ints and floats: the inclusive bounds
    maximum: float | None = None
    above: float | None = None  # floats: the exclusive bounds
    below: float | None = None
    cli_range: bool = True  # ints: the CLI refuses a value under the minimum (False: validate() does, in one line)
    cli_default: Any = None  # a required field's default on the command line
    switch: bool = False  # a bool offered as --x/--no-x (else as a flag --x)
    directory: bool = False  # a path to a directory
    only_on: tuple[str, ...] = ()  # the backends that honour it (they receive it: TrainConfig.backend_options)
    only_on_value: Any = True  # the value that needs one of them (given without --backend: selects the first)
    budget_of: str | None = None  # a budget option: the cost kind whose amount it gives, or SHARE
    for_selectors: bool = False  # its help starts with the selectors that read it
    name: str = ""
    kind: type = str
    default: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """How messages name it: its --flag, or its settings.json key where the CLI does not offer it."""
        return self.flag if self.cli else f"the setting {self.name}"


def setting(default: Any = dataclasses.MISSING, help: str = "", **options: Any) -> Any:
    """A TrainConfig field with its Setting (see Setting for the options)."""
    return field(default=default, metadata={"setting": Setting(help, **options)})


def _selector_help() -> str:
    return "; ".join(f"{s.name}: {s.summary}" for s in SELECTORS.values()) + "."


def _init_help() -> str:
    rules = {s.name: s.first_epoch for s in SELECTORS.values() if s.first_epoch is not None}
    defaults = ", ".join(f"{rule} for {name}" for name, rule in rules.items())
    return f"First-epoch selection of the selectors that need a trained epoch first ({', '.join(rules)}) [default: {defaults}]."


def _selector_option(default: Any, help: str, cli: str = TRAIN, **options: Any) -> Any:
    """A setting that only some selectors read (its help starts with their names)."""
    return setting(default, help, cli=cli, for_selectors=True, **options)


@dataclass
class TrainConfig:
    artifacts: str = setting(help="Training artifacts directory (from onnx-neq prepare).")
    data: str = setting(
        help="digits | fashion-mnist[:DIR] | cifar10:DIR | cifar100:DIR | imagefolder:DIR | npz:FILE", cli=TRAIN, cli_default="digits"
    )
    out: str = setting(help="Run directory [default: runs/SELECTOR-DATA-TIME].", cli=TRAIN, directory=True)
    budget: int | None = setting(None, "Max updated conv parameters per epoch (--cost params).", cli=TRAIN, minimum=0, budget_of="params")
    budget_ratio: float | None = setting(
        None, f"Budget as a fraction of the total in the cost model's unit [default: {DEFAULT_RATIO}].", cli=TRAIN, above=0, budget_of=SHARE
    )
    selector: str = setting(VELOCITY, _selector_help(), cli=TRAIN, choices=tuple(SELECTORS))
    init: str | None = setting(None, _init_help(), cli=TRAIN, choices=FIRST_EPOCH_RULES)
    epochs: int = setting(30, "Epochs to train (the learning-rate schedule's length).", cli=RECIPE, minimum=1)
    lr: float = setting(0.05, "Peak learning rate (warm-up from 0, then cosine, per iteration).", cli=RECIPE, above=0)
    batch_size: int = setting(32, "Training batch size.", cli=RECIPE, minimum=2)
    warmup_epochs: int = setting(5, "Epochs of linear learning-rate warm-up (at most --epochs - 1).", cli=RECIPE, minimum=0)
    seed: int = setting(0, "Seed of the validation split, the batch order and the random draws.", cli=TRAIN, minimum=0, cli_range=False)
    velocity_images: int = setting(10, "Size of the fixed velocity set, drawn from the validation split.", cli=TRAIN, minimum=1)
    mu: float = setting(0.5, "Velocity momentum.", cli=TRAIN, minimum=0, maximum=1)
    eps: float | None = _selector_option(
        None, "the threshold on |velocity| (scotti: its initial value, then learned; below 0 freezes nothing) [default: 1e-3 for neq"
        " (NEq's commands), 0.05 for scotti (its authors' optimizer code)]."
    )  # fmt: skip
    momentum: float = _selector_option(0.9, "initial heavy-ball momentum, then learned (the authors' 0.9).", minimum=0, maximum=1)
    hyper_lr: float = _selector_option(1e-4, "step of the lr's and momentum's own SGD; 0 keeps them fixed (the authors' 1e-4).", minimum=0)
    eps_hyper_lr: float = _selector_option(1e-4, "step of the threshold's own SGD; 0 keeps it fixed (the authors' 1e-4).", minimum=0)
    weight_decay: float = _selector_option(1e-3, "weight decay in its update, masked like it (the authors' 1e-3).", minimum=0)
    su_scheme: str | None = setting(
        None, "Sparse Update scheme: 1-5 (MobileNetV2) or a JSON/YAML file [default: largest built-in within the budget].", cli=TRAIN
    )
    backfill: bool = setting(False, "Greedy selection keeps filling the budget with cheaper neurons after the first misfit.", cli=TRAIN)
    recurrence: str = setting("code", "Velocity recurrence: the authors' code, or the slides'.", cli=TRAIN, choices=RECURRENCES)
    classes: list[int] | None = setting(None, "Keep only these classes, relabelled 0..k-1 (e.g. 5-9).", cli=TRAIN)
    val_fraction: float = setting(0.2, "Share of the training images held out for validation.", above=0, below=1)
    threads: int = setting(0, "ONNX Runtime threads (0: all cores).", cli=RECIPE, minimum=0)
    memory_pattern: bool = setting(
        False,
        f"{PORTABLE}/{SPECIALIZED}: ORT's memory pattern, one planned block for a step's tensors (up to 2x peak RSS; no faster in our measurements).",
        cli=RECIPE,
        switch=True,
        only_on=(PORTABLE, SPECIALIZED),
    )
    eval_batch_size: int = setting(256, "Images per evaluation batch.", minimum=1)
    budget_label: str | None = setting(None, "How reports name this run's budget row (compare sets it).")
    train_limit: int | None = setting(
        None, "Use a fixed stratified subset of N training images (before the validation split).", cli=RECIPE, minimum=2
    )
    backend: str | None = setting(
        None,
        f"{ORT_TRAINING} (onnxruntime-training), {PORTABLE} (stock onnxruntime) or {SPECIALIZED} (portable, each epoch's graph computing only"
        f" what the selection trains) [default: {ORT_TRAINING} where installed].",
        cli=RECIPE,
        choices=tuple(BACKENDS),
    )
    bn_update: str | None = setting(
        None,
        "BatchNorm scale/bias: always trained (the paper), or only with their conv's selected channels, counted in the budget"
        f" (--backend {SPECIALIZED}) [default: always; selected with --cost compute|memory].",
        cli=RECIPE,
        choices=BN_UPDATES,
        only_on=(SPECIALIZED,),
        only_on_value=SELECTED,
    )
    cost: str | None = setting(
        None,
        "What a selection costs: parameters (the paper), backward MACs per image, or bytes of training memory; compute and memory rank and"
        f" fill within that unit, reach included, on --backend {SPECIALIZED} [default: params, or the unit of --compute-budget/--memory-budget].",
        cli=RECIPE,
        choices=COST_KINDS,
    )
    compute_budget: str | None = setting(
        None, "Max backward MACs per image, e.g. 120M (implies --cost compute).", cli=TRAIN, budget_of="compute"
    )
    memory_budget: str | None = setting(
        None, "Max training memory in bytes, e.g. 256KB (implies --cost memory).", cli=TRAIN, budget_of="memory"
    )
    phi: str = setting(
        "spatial",
        "Velocity's phi: cosine over each image's positions (the paper), or over all images and positions at once (informative at 1x1 maps).",
        cli=RECIPE,
        choices=PHI_MODES,
    )
    rank_cost: str = setting(
        "exact",
        "Cost that rankings divide by: exact, or a depthwise neuron at C_in times its weights (the authors' code); the budget counts exact costs.",
        cli=RECIPE,
        choices=RANK_COSTS,
    )
    probe_batches: int = _selector_option(2, "training batches per epoch on which every channel's gradient is measured.", RECIPE, minimum=1)
    gradnorm_pool: int = _selector_option(
        0, "draw only from the N layers of largest gradient norm per parameter (0: all).", RECIPE, minimum=0
    )
    initial_weights: str | None = setting(None, "A checkpoint to start from instead of the artifacts' parameters (prune's rounds).")
    shard: str | None = setting(
        None,
        "Train on one client's part of the training split only (a fleet's client): CLIENT/CLIENTS/SPLIT/SEED, e.g. 2/10/dirichlet:0.5/0.",
    )

    def validate(self) -> None:
        """Every setting in range (new, or read back from settings.json: untrusted); see validate()."""
        validate(self)

    @property
    def cost_kind(self) -> str:
        """--cost, or the unit of the budget option given (--compute-budget, --memory-budget), or params."""
        if self.cost is not None:
            return self.cost
        given = (s.budget_of for s in SETTINGS if s.budget_of not in (None, SHARE, "params") and getattr(self, s.name) is not None)
        return next(given, "params")

    @property
    def first_epoch_init(self) -> str:
        return self.init or SELECTORS[self.selector].first_epoch or RANDOM

    def budget_request(self) -> BudgetRequest:
        """The budget options, as selection/budget.py reads them: the amount in the run's unit and the share."""
        amount, share = AMOUNTS[self.cost_kind], AMOUNTS[SHARE]
        return BudgetRequest(
            self.selector, self.first_epoch_init, getattr(self, amount.name), amount.flag, getattr(self, share.name), share.flag
        )

    def backend_options(self) -> dict[str, Any]:
        """The settings that the run's backend takes (open_backend's options): those it honours, when set."""
        return {s.name: getattr(self, s.name) for s in settings_of(type(self)) if self.backend in s.only_on and getattr(self, s.name)}


def _bound(f: dataclasses.Field, hints: dict[str, Any]) -> Setting:
    kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)] or [hints[f.name]]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    meta: Setting = f.metadata["setting"]
    default = None if f.default is dataclasses.MISSING else f.default
    readers = "/".join(s.name for s in SELECTORS.values() if f.name in s.options)
    help = f"{readers}: {meta.help}" if meta.for_selectors else meta.help
    return dataclasses.replace(meta, name=f.name, kind=kind, default=default, help=help)


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """The settings of TrainConfig, or of a subclass that adds its own (a command's: their fields must have defaults)."""
    hints = typing.get_type_hints(cls)
    return tuple(_bound(f, hints) for f in dataclasses.fields(cls))


SETTINGS: tuple[Setting, ...] = settings_of(TrainConfig)
BY_NAME = {s.name: s for s in SETTINGS}
AMOUNTS = {s.budget_of: s for s in SETTINGS if s.budget_of}  # the budget options by cost kind (and SHARE)
assert set(AMOUNTS) == {*COST_KINDS, SHARE}, "every cost kind needs its budget option"


# validation ----------------------------------------------------------------------------------------
def validate(config: TrainConfig) -> None:
    """Every setting in range: NeqError naming the flag. Options that only some backends honour select such a backend."""
    for s in settings_of(type(config)):
        problem = _problem(s, getattr(config, s.name))
        if problem:
            raise NeqError(f"{s.label} must be {problem}")
    if config.classes is not None and (
        len(set(config.classes)) != len(config.classes) or len(config.classes) < 2 or min(config.classes) < 0
    ):
        raise NeqError(f"--classes must name at least two different classes, not {config.classes}")
    if config.shard is not None:
        parse_shard(config.shard)
    _check_cost(config)
    _check_selector(config)
    _check_backend(config)


def _problem(s: Setting, value: Any) -> str | None:
    """What `value` must be instead, or None when it is fine."""
    if s.choices:
        allowed = (None, *s.choices) if s.default is None else s.choices
        return None if value in allowed else f"one of {', '.join(s.choices)}, not {value!r}"
    if value is None or s.kind is bool:
        return None
    if s.kind is int and s.minimum is not None and not s.minimum <= value <= MAX_COUNT:
        return f"an integer from {s.minimum} to {MAX_COUNT:,}, not {value}"
    if s.kind is float and not (math.isfinite(value) and _within(s, value)):
        return f"{_range_text(s)}, not {value}"
    return None


def _within(s: Setting, value: float) -> bool:
    return all(
        (
            s.minimum is None or value >= s.minimum,
            s.maximum is None or value <= s.maximum,
            s.above is None or value > s.above,
            s.below is None or value < s.below,
        )
    )


def _range_text(s: Setting) -> str:
    if s.above is not None and s.below is not None:
        return f"a number strictly between {s.above:g} and {s.below:g}"
    if s.minimum is not None and s.maximum is not None:
        return f"a number from {s.minimum:g} to {s.maximum:g}"
    if s.above is not None:
        return f"a finite number above {s.above:g}"
    return f"a finite number of at least {s.minimum:g}" if s.minimum is not None else "a finite number"


def _check_cost(config: TrainConfig) -> None:
    """--cost and the budget options agree on one unit (and one budget option at most); compute and memory
    imply --bn-update selected and the specialised backend (the masked ones run the whole backward pass)."""
    kind, share = config.cost_kind, AMOUNTS[SHARE]
    for other, amount in AMOUNTS.items():
        if other not in (kind, SHARE) and getattr(config, amount.name) is not None:
            raise NeqError(f"{amount.flag} is a budget in another unit than --cost {kind}; give {AMOUNTS[kind].flag} or {share.flag}")
    given = [s.flag for s in sorted(AMOUNTS.values(), key=lambda s: s.budget_of == SHARE) if getattr(config, s.name) is not None]
    if len(given) > 1:
        raise NeqError(f"give one of {', '.join(given)}, not several")
    if kind != "params":
        if config.bn_update == ALWAYS:
            raise NeqError(f"--cost {kind} trains a channel's BatchNorm with it (--bn-update selected); drop --bn-update always")
        if config.backend not in (None, SPECIALIZED):
            raise NeqError(f"--cost {kind} needs --backend {SPECIALIZED}: the masked backends compute the whole backward pass")
        config.bn_update, config.backend = SELECTED, SPECIALIZED


def _check_selector(config: TrainConfig) -> None:
    """The selector's own defaults for options left unset; a selector with its own loop policy that updates on the
    host (scotti) runs on a backend that hands it the gradients (specialized for SGD artifacts, else portable)."""
    spec = SELECTORS[config.selector]
    for option, value in spec.defaults.items():
        if getattr(config, option) is None:
            setattr(config, option, value)
    if spec.policy is None:
        return
    if config.backend == ORT_TRAINING:
        raise NeqError(
            f"--selector {spec.name} updates on the host every step; use --backend {SPECIALIZED} or {PORTABLE} (not {ORT_TRAINING})"
        )
    if config.backend is None:
        config.backend = SPECIALIZED if _prepared_optimizer(config.artifacts) == "sgd" else PORTABLE


def _prepared_optimizer(artifacts: str | None) -> str | None:
    """The optimizer the artifacts were prepared for (None where they cannot be read: train reports that)."""
    from onnx_neq.manifest import read_manifest

    try:
        return read_manifest(artifacts).optimizer if artifacts else None
    except NeqError:
        return None


def _check_backend(config: TrainConfig) -> None:
    """A setting that only some backends honour (--bn-update selected: specialized; --memory-pattern: portable,
    specialized), given without --backend, selects the first backend that honours all such settings given;
    with a backend that ignores it, it is refused."""
    wants = [s for s in settings_of(type(config)) if s.only_on and getattr(config, s.name) == s.only_on_value]
    if config.backend is None and wants:
        common = [b for b in wants[0].only_on if all(b in s.only_on for s in wants)]
        config.backend = (common or wants[0].only_on)[0]
    for s in wants:
        if config.backend not in s.only_on:
            flag = s.flag if s.only_on_value is True else f"{s.flag} {s.only_on_value}"
            raise NeqError(f"{flag} needs --backend {' or '.join(s.only_on)}; --backend {config.backend} ignores it")
    config.bn_update = config.bn_update or ALWAYS
