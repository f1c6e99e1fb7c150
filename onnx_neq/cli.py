"""The `onnx-neq` command line: parse, call the library, print. Heavy imports happen lazily."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from onnx_neq.backends.base import BACKENDS
from onnx_neq.errors import EXIT_INTERRUPTED, EXIT_UNEXPECTED, InterruptedRun, NeqError, environment_error, user_error_in_chain
from onnx_neq.fleet.config import FLEET, FleetConfig
from onnx_neq.results.plan import DEFAULT_METHODS, DEFAULT_SEEDS, PAPER_RATIOS, parse_method
from onnx_neq.training import metrics
from onnx_neq.training.config import PRUNE, RECIPE, TRAIN, Setting, TrainConfig, settings_of
from onnx_neq.training.prune_config import PruneConfig


class _Numbers(click.ParamType):
    """Comma-separated numbers, '0.5,0.5,0.5' -> [0.5, 0.5, 0.5]; a value that is not one: a NeqError (one line)."""

    def __init__(self, cast: type, what: str, example: str):
        self.cast, self.what, self.example, self.name = cast, what, example, what

    def convert(self, value, param, ctx) -> list:
        if isinstance(value, list):
            return value
        try:
            return [self.cast(x) for x in value.split(",")]
        except ValueError:
            raise NeqError(f"{_flag(param)} takes comma-separated {self.what} such as {self.example}, not {value!r}") from None


class _Methods(click.ParamType):
    """Comma-separated methods, each a selector with optional variant settings in brackets, where ';' or ','
    separate them: 'velocity[phi=flat;rank_cost=authors],random' -> ['velocity[phi=flat,rank_cost=authors]', 'random']."""

    name = "methods"

    def convert(self, value, param, ctx) -> list[str]:
        if isinstance(value, list):
            return value
        parts, depth, current = [], 0, ""
        for ch in value:
            depth += (ch == "[") - (ch == "]")
            if ch == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += ";" if ch == "," else ch
        methods = [p.strip().replace(";", ",") for p in [*parts, current] if p.strip()]
        for method in methods:
            parse_method(method)  # an unknown selector or variant: its NeqError now, before any run
        return methods


class _Classes(click.ParamType):
    """'5-9' or '0,2,4' -> a list of class indices (data.datasets.parse_classes)."""

    name = "classes"

    def convert(self, value, param, ctx) -> list[int]:
        from onnx_neq.data.datasets import parse_classes

        return value if isinstance(value, list) else parse_classes(value)


def _flag(param: click.Parameter | None) -> str:
    return max(param.opts, key=len) if param is not None and param.opts else "the value"


FLOATS = _Numbers(float, "numbers", "0.5,0.5,0.5")


class _Group(click.Group):
    """One line on stderr per failure, with the exit status of errors.py: a NeqError (also one
    wrapped by an onnx_ir pass) and an OSError are the user's to fix (2, or 3 for a divergence);
    anything else is unexpected (1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except Exception as exc:
            if ctx.meta.get("debug"):
                raise
            user = user_error_in_chain(exc)
            if user is not None:
                _fail(f"error: {user}", user.exit_code)
            if isinstance(exc, OSError):
                error = environment_error(exc)
                _fail(f"error: {error}", error.exit_code)
            _fail(f"internal error: {exc.__class__.__name__}: {exc} (re-run with --debug for the traceback)", EXIT_UNEXPECTED)


def _fail(message: str, code: int):
    click.echo(f"onnx-neq: {' '.join(message.split())}", err=True)
    sys.exit(code)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="onnx-neq")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Budgeted neuron-selection fine-tuning of CNNs on ONNX Runtime training."""
    ctx.meta["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("arch", type=click.Choice(["resnet18", "resnet50", "mobilenet_v2"]))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="ONNX file to write.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), help="torchvision-compatible .pth state dict.")
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=1000,
    show_default=True,
    help="Classes of the head; a different count than the weights' replaces the head.",
)
@click.option("--resolution", type=click.IntRange(min=8), default=224, show_default=True, help="Input height and width.")
@click.option("--width-mult", type=click.FloatRange(min=0.05), default=1.0, show_default=True, help="MobileNetV2 width multiplier.")
@click.option(
    "--bn",
    type=click.Choice(["train", "frozen"]),
    default="train",
    show_default=True,
    help="BatchNorm during training: batch statistics (train) or running statistics (frozen).",
)
@click.option("--mean", type=FLOATS, default="0.485,0.456,0.406", show_default=True, help="Input normalization mean, recorded for prepare.")
@click.option("--std", type=FLOATS, default="0.229,0.224,0.225", show_default=True, help="Input normalization std, recorded for prepare.")
def export(arch, output, weights, num_classes, resolution, width_mult, bn, mean, std) -> None:
    """Export a torchvision-shaped CNN to an ONNX file that ORT training accepts (needs torch)."""
    from onnx_neq.export import export as run_export

    report = run_export(arch, output, weights, num_classes, resolution, width_mult, bn, mean=mean, std=std)
    head = " (head re-initialized for the new class count)" if report.head_replaced else ""
    click.echo(f"wrote {output}: {arch}, {report.params:,} parameters, {num_classes} classes, {resolution}x{resolution} input{head}")
    click.echo(f"ONNX Runtime vs PyTorch logits: max |diff| = {report.max_abs_diff:.2e}")
    if weights is None:
        click.echo("warning: no --weights given, so the weights are random: fine-tuning this model is training from scratch", err=True)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("artifacts"),
    show_default=True,
    help="Artifacts directory to write.",
)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True, help="Optimizer model to generate.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="AdamW decoupled weight decay [default: 0.01 for adamw].")
@click.option("--mean", type=FLOATS, default=None, help="Override the input normalization mean (comma-separated).")
@click.option("--std", type=FLOATS, default=None, help="Override the input normalization std (comma-separated).")
@click.option("--num-classes", type=click.IntRange(min=2), default=None, help="Replace the classifier head with a fresh one of N classes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the new head's initialization.")
@click.option(
    "--input-shape",
    type=_Numbers(int, "integers", "1,3,224,224"),
    default=None,
    help="N,C,H,W to fix dynamic input dims (the batch stays dynamic), e.g. 1,3,224,224.",
)
def prepare(model, out_dir, optimizer, weight_decay, mean, std, num_classes, seed, input_shape) -> None:
    """Make training artifacts (gradient graph with per-channel masks, activation taps, manifest)."""
    from onnx_neq.graph.prepare import prepare as run_prepare
    from onnx_neq.results.summary import manifest_summary, prepare_changes

    report = run_prepare(model, out_dir, optimizer, mean, std, weight_decay, num_classes, seed, input_shape)
    click.echo(manifest_summary(report.manifest))
    click.echo(prepare_changes(report))
    files = ", ".join([*report.manifest.files.values(), "manifest.json"])
    click.echo(f"\nwrote {out_dir.as_posix().rstrip('/')}/: {files}")
    if report.ort_training:
        click.echo(f"no ORT-training artifacts (--backend ort-training): {report.ort_training}")


@main.command("export-inference")
@click.argument("artifacts_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Inference ONNX file to write.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint to take the weights from (default: the artifacts' own).")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None, help="Backend whose checkpoint format --checkpoint has.")
def export_inference(artifacts_dir, output, checkpoint, backend) -> None:
    """Write an inference model (logits only: no masks, no taps, no loss) from artifacts."""
    from onnx_neq.backends.base import open_backend

    if checkpoint is not None and not checkpoint.exists():
        raise NeqError(f"checkpoint {checkpoint} does not exist")
    session = open_backend(backend, artifacts_dir, checkpoint)
    output.parent.mkdir(parents=True, exist_ok=True)
    session.export_inference(output)
    click.echo(f"wrote {output}")


def _option(s: Setting):
    """The click option of a setting (training/config.py)."""
    if s.kind is bool and not s.switch:
        return click.option(s.flag, is_flag=True, help=s.help)
    decl = f"{s.flag}/--no-{s.flag[2:]}" if s.switch else s.flag
    default = s.default if s.default is not None else s.cli_default
    return click.option(decl, s.name, type=_type(s), default=default, show_default=default is not None, help=s.help)


def _type(s: Setting) -> click.ParamType | None:
    if s.choices:
        return click.Choice(list(s.choices))
    if s.directory:
        return click.Path(file_okay=False, path_type=Path)
    if s.kind is int:
        return click.IntRange(min=s.minimum) if s.minimum is not None and s.cli_range else click.INT
    return {float: click.FLOAT, str: click.STRING, list: _Classes(), bool: click.BOOL}[s.kind]


def _settings_options(where: str, config_class: type = TrainConfig):
    """The options of the settings of `config_class` that the CLI offers `where` (TRAIN or RECIPE), in the table's order."""

    def decorate(command):
        for s in reversed([s for s in settings_of(config_class) if s.cli == where]):
            command = _option(s)(command)
        return command

    return decorate


@main.command("train")
@click.argument("artifacts_dir", required=False, type=click.Path(path_type=Path))
@_settings_options(TRAIN)
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out with its stored settings.")
@_settings_options(RECIPE)
def train_command(artifacts_dir, resume, **settings) -> None:
    """Fine-tune under a parameter budget; between epochs the selector rewrites the masks.

    With no arguments: the shipped MobileNetV2 0.35 (pretrained on Fashion-MNIST classes 0-4)
    fine-tuned on digits at 30.8% of its selectable parameters with the velocity selector.
    """
    from onnx_neq.results.summary import train_summary
    from onnx_neq.training.train import train

    out, data = settings.pop("out"), settings["data"]
    if resume and out is None:
        raise NeqError("--resume needs --out RUN_DIR, the run to continue")
    if artifacts_dir is None and not resume:
        artifacts_dir = _default_artifacts(data, settings["classes"])
    out = out or Path("runs") / f"{settings['selector']}-{data.split(':')[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = TrainConfig(artifacts=str(artifacts_dir or ""), out=str(out), **settings)
    ctx = click.get_current_context()
    given = {k: v for k, v in settings.items() if _given(ctx, k)}
    progress = _Progress()
    try:
        result = train(config, resume=resume, progress=progress, overrides=given if resume else None)
    except KeyboardInterrupt:
        progress.clear()
        raise InterruptedRun(f"interrupted; continue with: onnx-neq train --out {out} --resume") from None
    progress.clear()
    click.echo(train_summary(result, with_table=not progress.shown_live(sys.stdout)))


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _default_artifacts(data: str, classes: list[int] | None) -> Path:
    """./artifacts when `onnx-neq prepare` wrote it here, else the shipped model (head fitted to the data)."""
    from onnx_neq.training.default_model import default_artifacts, local_artifacts

    return local_artifacts() or default_artifacts(_count_classes(data, classes))


def _count_classes(data: str, classes: list[int] | None) -> int:
    from onnx_neq.data.datasets import load_dataset

    return len(classes) if classes else load_dataset(data).num_classes


class _Progress:
    """What the run says before its first epoch, its epoch rows as they finish, and a live step line on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.header = False

    def shown_live(self, stream) -> bool:
        """True when the epoch rows already went to the terminal that `stream` writes to."""
        return self.header and self.tty and stream.isatty()

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            for line in _start_lines(info):
                click.echo(line, err=True)
        elif event == "step" and self.tty:
            done = int(20 * info["step"] / info["steps"])
            click.echo(
                f"\repoch {info['epoch']} of 0-{info['epochs'] - 1} [{'#' * done}{'.' * (20 - done)}] {info['step']}/{info['steps']} loss {info['loss']:.4f}",
                err=True,
                nl=False,
            )
        elif event == "epoch":
            self.clear()
            if not self.header:
                click.echo("epoch  lr        loss     train   val     test    updated    selected  seconds", err=True)
                self.header = True
            r, m = info, metrics
            click.echo(
                f"{r[m.EPOCH]:>5}  {float(r[m.LR]):<8.4g}  {float(r[m.TRAIN_LOSS]):<7.4f}  {float(r[m.TRAIN_TOP1]):.4f}  {float(r[m.VAL_TOP1]):.4f}"
                f"  {float(r[m.TEST_TOP1]):.4f}  {_count(r.get(m.UPDATED_PARAMS)):>9}  {_count(r.get(m.SELECTED_NEURONS)):>8}"
                f"  {float(r[m.EPOCH_SECONDS]):>7.2f}",
                err=True,
            )

    def clear(self) -> None:
        if self.tty:
            click.echo("\r" + " " * 79 + "\r", err=True, nl=False)


def _count(value) -> str:
    """A count with thousands separators; "-" where a policy has none (prune trains every neuron)."""
    return f"{value:,}" if isinstance(value, int) else "-"


def _start_lines(info: dict) -> list[str]:
    b = info["budget"]
    train_n, val_n, test_n = info["sizes"]
    lines = [
        f"model     {info['artifacts']} (from {Path(info['source_model']).name}: {info['layers']} convs, {info['neurons']:,} neurons, {info['num_classes']} classes)",
        f"data      {info['data']}: {train_n:,} train / {val_n:,} val / {test_n:,} test images",
        f"budget    {b.describe()}, selector {info['selector']}, {info['epochs']} epochs",
        f"backend   {info['backend']}",
    ]
    if info.get("resumed_at") is not None:
        lines.append(f"resuming  at epoch {info['resumed_at']}")
    return lines + [f"warning   {note}" for note in info["notes"]]


PRUNE_RECIPE = ("data", "classes", "seed", "epochs", "lr", "batch_size", "warmup_epochs", "train_limit", "backend", "threads")


def _named_options(names: tuple[str, ...], config_class: type):
    """The options of the settings `names` of `config_class`, in that order."""
    by_name = {s.name: s for s in settings_of(config_class)}

    def decorate(command):
        for name in reversed(names):
            command = _option(by_name[name])(command)
        return command

    return decorate


@main.command("prune")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output directory (the same command continues it)."
)
@_settings_options(PRUNE, PruneConfig)
@_named_options(PRUNE_RECIPE, PruneConfig)
def prune_command(model, out, **settings) -> None:
    """Prune MODEL in rounds (Entropy-Guided Pruning or global magnitude), fine-tuning between rounds.

    Round 0 fine-tunes the dense model for --epochs; each later round prunes --share of the remaining weights
    of the convs an activation follows, then fine-tunes for --epochs with those weights held at exactly 0.
    """
    from onnx_neq.results.summary import prune_summary
    from onnx_neq.training.prune import prune

    config = PruneConfig(artifacts="", model=str(model), out=str(out), **settings)
    progress = _Progress()
    try:
        result = prune(config, progress=progress)
    except KeyboardInterrupt:
        progress.clear()
        raise InterruptedRun(f"interrupted; continue with the same command (it resumes from {out})") from None
    progress.clear()
    click.echo(prune_summary(result))


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", default="digits", show_default=True, help="Data spec, as for train.")
@click.option("--classes", type=_Classes(), default=None, help="Keep only these classes (as for train).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
def eval_command(model, data, classes, split) -> None:
    """Top-1 of an inference model written by `onnx-neq train` (MODEL or RUN_DIR)."""
    from onnx_neq.training.evaluate import evaluate

    if model.is_dir():
        model = model / "model.onnx"
    result = evaluate(model, data, classes, split)
    click.echo(f"{result.model}: top-1 {result.top1:.4f} on {result.images:,} {split} images of {result.data}")


def _list_option(flag: str, param_type: click.ParamType, values, what: str):
    """A comma-separated list option whose default is `values`."""
    return click.option(flag, type=param_type, default=",".join(map(str, values)), show_default=True, help=f"Comma-separated {what}.")


@main.command("compare")
@click.argument("artifacts_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--data",
    "datas",
    multiple=True,
    default=["digits"],
    show_default=True,
    help="Data spec (repeat for more columns), e.g. fashion-mnist@5-9.",
)
@_list_option(
    "--methods", _Methods(), DEFAULT_METHODS, "selectors, each optionally with variant options: velocity[phi=flat;rank_cost=authors]"
)
@_list_option("--budget-ratios", _Numbers(float, "numbers", "0.1,0.3"), PAPER_RATIOS, "budget fractions")
@_list_option("--seeds", _Numbers(int, "integers", "0,42,100"), DEFAULT_SEEDS, "seeds")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for runs/ and report/.")
@_settings_options(RECIPE)
def compare_command(artifacts_dir, datas, methods, budget_ratios, seeds, out, **train_options) -> None:
    """Run selectors x budgets x seeds on each data set; write the paper-shaped table and plots."""
    from onnx_neq.results.compare import CompareConfig, compare
    from onnx_neq.training.default_model import default_artifacts

    def artifacts_for(data: str) -> str:
        return str(artifacts_dir) if artifacts_dir else str(default_artifacts(_count_classes(data, None)))

    config = CompareConfig(
        data=list(datas), out=str(out), methods=methods, budget_ratios=budget_ratios, seeds=seeds, train_options=train_options
    )
    progress = _CompareProgress()
    files = compare(config, artifacts_for, progress=progress)
    click.echo(files["markdown"].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in files.values()))
    if progress.failed:
        raise NeqError(f"{len(progress.failed)} run(s) failed and are not in the report (listed above with their reasons)")


class _CompareProgress(_Progress):
    def __init__(self) -> None:
        super().__init__()
        self.failed: list[str] = []

    def __call__(self, event: str, info: dict) -> None:
        if event == "failed":
            self.clear()
            self.failed.append(info["path"])
            click.echo(f"[{info['index']}/{info['total']}] failed: {info['path']}: {info['error']}", err=True)
        elif event in ("run", "skip"):
            self.clear()
            self.header = True
            click.echo(f"[{info['index']}/{info['total']}] {'done already: ' if event == 'skip' else ''}{info['path']}", err=True)
        elif event == "step":
            super().__call__(event, info)


@main.group("fleet")
def fleet_group() -> None:
    """Federated fine-tuning on Flower: each client trains its budget and sends only the channels it trained."""


def _fleet_config(artifacts_dir, settings: dict) -> FleetConfig:
    out = settings.pop("out") or Path("runs") / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}"
    artifacts_dir = artifacts_dir or _default_artifacts(settings["data"], settings["classes"])
    return FleetConfig(artifacts=str(artifacts_dir), out=str(out), **settings)


def _fleet_logging() -> None:
    """Our round lines on stderr; Flower's own only when they are errors (all of them with --debug)."""
    if not click.get_current_context().find_root().meta.get("debug"):
        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("onnx_neq.fleet").setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("onnx_neq.fleet").addHandler(handler)
    logging.getLogger("onnx_neq.fleet").propagate = False


@fleet_group.command("simulate")
@click.argument("artifacts_dir", required=False, type=click.Path(path_type=Path))
@_settings_options(FLEET, FleetConfig)
@_settings_options(TRAIN, FleetConfig)
@_settings_options(RECIPE, FleetConfig)
def fleet_simulate_command(artifacts_dir, **settings) -> None:
    """Run a fleet of --clients on Flower's simulation engine, on this machine.

    The training split is shared among the clients (--split); each round every client fine-tunes the global
    parameters for --epochs under its budget and sends the rows of the channels it trained; the server merges
    them per channel. OUT/rounds.csv has a row per round and client; OUT/model.onnx is the global model. The
    same command on the same --out continues after the last completed round.
    """
    from onnx_neq.fleet.flower_app import simulate
    from onnx_neq.results.summary import fleet_summary

    _fleet_logging()
    server = simulate(_fleet_config(artifacts_dir, settings))
    click.echo(fleet_summary(server.rows(), server.out))


@fleet_group.command("app")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--artifacts", "artifacts_dir", type=click.Path(path_type=Path), help="Training artifacts [default: as for train].")
@click.option("--superlink", default="127.0.0.1:8000", show_default=True, help="The SuperLink's address (host:port).")
@_settings_options(FLEET, FleetConfig)
@_settings_options(TRAIN, FleetConfig)
@_settings_options(RECIPE, FleetConfig)
def fleet_app_command(directory, artifacts_dir, superlink, **settings) -> None:
    """Write a Flower app for the deployment engine (a SuperLink and SuperNodes) and print how to start it.

    --clients is the number of SuperNodes the training split is shared among (each started with its
    partition-id); a SuperNode's --node-config may also set its own budget, data and artifacts.
    """
    from onnx_neq.fleet.app_dir import write_app

    config = _fleet_config(artifacts_dir, settings)
    config.out = str(Path(config.out).resolve())
    config.artifacts = str(Path(config.artifacts).resolve())
    commands = write_app(directory, config, superlink)
    click.echo(f"wrote the Flower app {directory}; the server writes {config.out}. Start, each in its own shell:")
    click.echo(f"  {commands.superlink}")
    for i in range(config.clients):
        click.echo("  " + commands.supernode.format(i=i, port=9094 + i))
    click.echo(f"  {commands.run}")


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the table and plots.")
def report_command(runs, out) -> None:
    """Table (Markdown, CSV) and plots (PNG) from existing run directories."""
    from onnx_neq.results.report import write_report

    files = write_report(list(runs), out)
    click.echo(files["markdown"].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()
