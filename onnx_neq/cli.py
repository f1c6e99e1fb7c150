"""The `onnx-neq` command line: parse, call the library, print. Heavy imports happen lazily."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from onnx_neq.backends.base import BACKENDS
from onnx_neq.errors import EXIT_INTERRUPTED, EXIT_UNEXPECTED, InterruptedRun, NeqError, environment_error, user_error_in_chain
from onnx_neq.selection.cost_model import KINDS as COST_KINDS
from onnx_neq.selection.registry import FIRST_EPOCH_RULES, RANK_COSTS, SELECTORS
from onnx_neq.selection.velocity import PHI_MODES


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
@click.option("--mean", default="0.485,0.456,0.406", show_default=True, help="Input normalization mean, recorded for prepare.")
@click.option("--std", default="0.229,0.224,0.225", show_default=True, help="Input normalization std, recorded for prepare.")
def export(arch, output, weights, num_classes, resolution, width_mult, bn, mean, std) -> None:
    """Export a torchvision-shaped CNN to an ONNX file that ORT training accepts (needs torch)."""
    from onnx_neq.export import export as run_export

    report = run_export(
        arch, output, weights, num_classes, resolution, width_mult, bn, mean=_floats(mean, "--mean"), std=_floats(std, "--std")
    )
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
@click.option("--mean", default=None, help="Override the input normalization mean (comma-separated).")
@click.option("--std", default=None, help="Override the input normalization std (comma-separated).")
@click.option("--num-classes", type=click.IntRange(min=2), default=None, help="Replace the classifier head with a fresh one of N classes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the new head's initialization.")
@click.option("--input-shape", default=None, help="N,C,H,W to fix dynamic input dims (the batch stays dynamic), e.g. 1,3,224,224.")
def prepare(model, out_dir, optimizer, weight_decay, mean, std, num_classes, seed, input_shape) -> None:
    """Make training artifacts (gradient graph with per-channel masks, activation taps, manifest)."""
    from onnx_neq.graph.prepare import prepare as run_prepare
    from onnx_neq.results.summary import manifest_summary, prepare_changes

    report = run_prepare(
        model, out_dir, optimizer, _floats(mean, "--mean"), _floats(std, "--std"), weight_decay, num_classes, seed, _ints(input_shape)
    )
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


def _classes(text: str | None) -> list[int] | None:
    from onnx_neq.data.datasets import parse_classes

    return parse_classes(text) if text is not None else None


def _choice(flag: str, choices, default: str | None, help: str):
    return click.option(flag, type=click.Choice(list(choices)), default=default, show_default=default is not None, help=help)


def _count(flag: str, minimum: int, default: int, help: str):
    return click.option(flag, type=click.IntRange(min=minimum), default=default, show_default=True, help=help)


def _recipe_options(command):
    """Options of the training recipe, shared by train and compare."""
    options = [
        click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True),
        click.option(
            "--lr", type=float, default=0.05, show_default=True, help="Peak learning rate (warm-up from 0, then cosine, per iteration)."
        ),
        click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True),
        click.option("--warmup-epochs", type=click.IntRange(min=0), default=5, show_default=True),
        click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="ONNX Runtime threads (0: all cores)."),
        click.option(
            "--memory-pattern/--no-memory-pattern",
            default=False,
            show_default=True,
            help="portable/specialized: ORT's memory pattern, one planned block for a step's tensors (up to 2x peak RSS; no faster in our measurements).",
        ),
        _choice(
            "--backend",
            BACKENDS,
            None,
            "ort-training (onnxruntime-training), portable (stock onnxruntime) or specialized (portable, each epoch's graph computing only what the selection trains) [default: ort-training where installed].",
        ),
        _choice(
            "--bn-update",
            ("always", "selected"),
            None,
            "BatchNorm scale/bias: always trained (the paper), or only with their conv's selected channels, counted in the budget (--backend specialized) [default: always; selected with --cost compute|memory].",
        ),
        _choice(
            "--cost",
            COST_KINDS,
            None,
            "What a selection costs: parameters (the paper), backward MACs per image, or bytes of training memory; compute and memory rank and fill within that unit, reach included, on --backend specialized [default: params, or the unit of --compute-budget/--memory-budget].",
        ),
        _choice(
            "--phi",
            PHI_MODES,
            "spatial",
            "Velocity's phi: cosine over each image's positions (the paper), or over all images and positions at once (informative at 1x1 maps).",
        ),
        _choice(
            "--rank-cost",
            RANK_COSTS,
            "exact",
            "Cost that rankings divide by: exact, or a depthwise neuron at C_in times its weights (the authors' code); the budget counts exact costs.",
        ),
        _count("--probe-batches", 1, 2, "gradnorm/fisher: training batches per epoch on which every channel's gradient is measured."),
        _count("--gradnorm-pool", 0, 0, "gradnorm: draw only from the N layers of largest gradient norm per parameter (0: every layer)."),
        click.option(
            "--train-limit",
            type=click.IntRange(min=2),
            default=None,
            help="Use a fixed stratified subset of N training images (before the validation split).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("train")
@click.argument("artifacts_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help="digits | fashion-mnist[:DIR] | cifar10:DIR | cifar100:DIR | imagefolder:DIR | npz:FILE",
)
@click.option("--classes", default=None, help="Keep only these classes, relabelled 0..k-1 (e.g. 5-9).")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Run directory [default: runs/SELECTOR-DATA-TIME]."
)
@click.option("--budget", type=click.IntRange(min=0), default=None, help="Max updated conv parameters per epoch (--cost params).")
@click.option("--compute-budget", default=None, help="Max backward MACs per image, e.g. 120M (implies --cost compute).")
@click.option("--memory-budget", default=None, help="Max training memory in bytes, e.g. 256KB (implies --cost memory).")
@click.option(
    "--budget-ratio", type=float, default=None, help="Budget as a fraction of the total in the cost model's unit [default: 0.308]."
)
@click.option(
    "--selector",
    type=click.Choice(list(SELECTORS)),
    default="velocity",
    show_default=True,
    help="; ".join(f"{s.name}: {s.summary}" for s in SELECTORS.values()) + ".",
)
@click.option(
    "--init",
    type=click.Choice(list(FIRST_EPOCH_RULES)),
    default=None,
    help="First-epoch selection of the selectors that need a trained epoch first (velocity, neq) [default: random; full for neq].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--velocity-images",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Size of the fixed velocity set, drawn from the validation split.",
)
@click.option("--mu", type=float, default=0.5, show_default=True, help="Velocity momentum.")
@click.option("--eps", type=float, default=1e-3, show_default=True, help="NEq threshold on |velocity|.")
@click.option(
    "--su-scheme",
    default=None,
    help="Sparse Update scheme: 1-5 (MobileNetV2) or a JSON/YAML file [default: largest built-in within the budget].",
)
@click.option("--backfill", is_flag=True, help="Greedy selection keeps filling the budget with cheaper neurons after the first misfit.")
@click.option(
    "--recurrence",
    type=click.Choice(["code", "textbook"]),
    default="code",
    show_default=True,
    help="Velocity recurrence: the authors' code, or the slides'.",
)
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out with its stored settings.")
@_recipe_options
def train_command(artifacts_dir, data, classes, out, resume, **options) -> None:
    """Fine-tune under a parameter budget; between epochs the selector rewrites the masks.

    With no arguments: the shipped MobileNetV2 0.35 (pretrained on Fashion-MNIST classes 0-4)
    fine-tuned on digits at 30.8% of its selectable parameters with the velocity selector.
    """
    from onnx_neq.results.summary import train_summary
    from onnx_neq.training.train import TrainConfig, train

    if resume and out is None:
        raise NeqError("--resume needs --out RUN_DIR, the run to continue")
    class_list = _classes(classes)
    if artifacts_dir is None and not resume:
        artifacts_dir = _default_artifacts(data, class_list)
    out = out or Path("runs") / f"{options['selector']}-{data.split(':')[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = TrainConfig(artifacts=str(artifacts_dir or ""), data=data, out=str(out), classes=class_list, **options)
    ctx = click.get_current_context()
    given = {k: v for k, v in {**options, "data": data, "classes": class_list}.items() if _given(ctx, k)}
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
            r = info
            click.echo(
                f"{r['epoch']:>5}  {float(r['lr']):<8.4g}  {float(r['train_loss']):<7.4f}  {float(r['train_top1']):.4f}  {float(r['val_top1']):.4f}  {float(r['test_top1']):.4f}  {r['updated_params']:>9,}  {r['selected_neurons']:>8,}  {float(r['epoch_seconds']):>7.2f}",
                err=True,
            )

    def clear(self) -> None:
        if self.tty:
            click.echo("\r" + " " * 79 + "\r", err=True, nl=False)


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


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", default="digits", show_default=True, help="Data spec, as for train.")
@click.option("--classes", default=None, help="Keep only these classes (as for train).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
def eval_command(model, data, classes, split) -> None:
    """Top-1 of an inference model written by `onnx-neq train` (MODEL or RUN_DIR)."""
    from onnx_neq.training.evaluate import evaluate

    if model.is_dir():
        model = model / "model.onnx"
    result = evaluate(model, data, _classes(classes), split)
    click.echo(f"{result.model}: top-1 {result.top1:.4f} on {result.images:,} {split} images of {result.data}")


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
@click.option(
    "--methods",
    default="velocity,random,su,full",
    show_default=True,
    help="Comma-separated selectors, each optionally with variant options: velocity[phi=flat;rank_cost=authors].",
)
@click.option("--budget-ratios", default="0.088,0.212,0.308", show_default=True, help="Comma-separated budget fractions.")
@click.option("--seeds", default="0,42,100,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for runs/ and report/.")
@_recipe_options
def compare_command(artifacts_dir, datas, methods, budget_ratios, seeds, out, **train_options) -> None:
    """Run selectors x budgets x seeds on each data set; write the paper-shaped table and plots."""
    from onnx_neq.results.compare import CompareConfig, compare
    from onnx_neq.training.default_model import default_artifacts

    def artifacts_for(data: str) -> str:
        return str(artifacts_dir) if artifacts_dir else str(default_artifacts(_count_classes(data, None)))

    config = CompareConfig(
        data=list(datas),
        out=str(out),
        methods=_methods(methods),
        budget_ratios=_floats(budget_ratios, "--budget-ratios"),
        seeds=[int(s) for s in seeds.split(",")],
        train_options=train_options,
    )
    progress = _CompareProgress()
    files = compare(config, artifacts_for, progress=progress)
    click.echo(files["markdown"].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in files.values()))
    if progress.failed:
        raise NeqError(f"{len(progress.failed)} run(s) failed and are not in the report (listed above with their reasons)")


def _methods(text: str) -> list[str]:
    """Split on commas outside brackets; inside them ';' or ',' separate variant options."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ";" if ch == "," else ch
    return [p.strip().replace(";", ",") for p in [*parts, current] if p.strip()]


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


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the table and plots.")
def report_command(runs, out) -> None:
    """Table (Markdown, CSV) and plots (PNG) from existing run directories."""
    from onnx_neq.results.report import write_report

    files = write_report(list(runs), out)
    click.echo(files["markdown"].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in files.values()))


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise NeqError(f"--input-shape takes comma-separated integers such as 1,3,224,224, not {text!r}") from None


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise NeqError(f"{option} takes comma-separated numbers such as 0.5,0.5,0.5, not {text!r}") from None
    return values


if __name__ == "__main__":
    main()
