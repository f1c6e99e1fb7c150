"""The `onnx-neq` command line: parse, call the library, print. Heavy imports happen lazily."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .errors import NeqError


class _Group(click.Group):
    """Turns NeqError into one line on stderr and exit 2; other errors into one line and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NeqError as exc:
            click.echo(f"onnx-neq: error: {exc}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("onnx-neq: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if ctx.meta.get("debug"):
                raise
            click.echo(f"onnx-neq: internal error: {exc.__class__.__name__}: {exc} (re-run with --debug for the traceback)", err=True)
            sys.exit(1)


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
    from .export import export as run_export

    report = run_export(
        arch, output, weights, num_classes, resolution, width_mult, bn, mean=_floats(mean, "--mean"), std=_floats(std, "--std")
    )
    head = " (head re-initialized for the new class count)" if report.head_replaced else ""
    click.echo(f"wrote {output}: {arch}, {report.params:,} parameters, {num_classes} classes, {resolution}x{resolution} input{head}")
    click.echo(f"ONNX Runtime vs PyTorch logits: max |diff| = {report.max_abs_diff:.2e}")


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
def prepare(model, out_dir, optimizer, weight_decay, mean, std, num_classes, seed) -> None:
    """Make ORT training artifacts with per-channel gradient masks, activation taps and a manifest."""
    from .prepare import prepare as run_prepare
    from .summary import manifest_summary, prepare_changes

    report = run_prepare(model, out_dir, optimizer, _floats(mean, "--mean"), _floats(std, "--std"), weight_decay, num_classes, seed)
    click.echo(manifest_summary(report.manifest))
    click.echo(prepare_changes(report))
    click.echo(f"\nwrote {out_dir}/: training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint, manifest.json")


@main.command("export-inference")
@click.argument("artifacts_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Inference ONNX file to write.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint to take the weights from (default: the artifacts' own).")
def export_inference(artifacts_dir, output, checkpoint) -> None:
    """Write an inference model (logits only: no masks, no taps, no loss) from artifacts."""
    from .session import TrainingSession

    if checkpoint is not None and not checkpoint.exists():
        raise NeqError(f"checkpoint {checkpoint} does not exist")
    session = TrainingSession(artifacts_dir, checkpoint)
    output.parent.mkdir(parents=True, exist_ok=True)
    session.export_inference(output)
    click.echo(f"wrote {output}")


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
