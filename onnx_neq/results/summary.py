"""Plain-text tables for what the CLI prints (the library itself never prints)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from onnx_neq.manifest import Manifest
from onnx_neq.training import metrics


def table(rows: list[tuple], headers: tuple[str, ...]) -> str:
    cells = [tuple(str(c) for c in headers)] + [tuple(_fmt(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def manifest_summary(m: Manifest) -> str:
    kinds = Counter(layer.kind for layer in m.layers)
    by_kind = [
        (kind, n, sum(lay.out_channels for lay in m.layers if lay.kind == kind), sum(lay.params for lay in m.layers if lay.kind == kind))
        for kind, n in sorted(kinds.items())
    ]
    by_kind.append(("total", len(m.layers), m.neurons, m.selectable_params))
    lines = [
        f"input      {m.input.name} {['N' if d is None else d for d in m.input.shape]}  mean {m.input.mean}  std {m.input.std}",
        f"classes    {m.num_classes}    optimizer {m.optimizer}",
        "",
        "selectable neurons (one per Conv output channel, masked through one input per Conv):",
        table(by_kind, ("kind", "layers", "neurons", "params")),
        "",
        "always trained, not counted against the budget:",
        table([("classifier", m.classifier_params), ("batchnorm scale+bias", m.bn_params), ("other", m.other_params)], ("group", "params")),
        f"frozen     {len(m.frozen_params)} tensors (BatchNorm running statistics and constants)",
    ]
    return "\n".join(lines)


def prepare_changes(report) -> str:
    """What prepare changed in the graph, one line each."""
    lines = list(report.normalized.lines())
    if report.head_replaced:
        lines.append(f"head       replaced: {report.head_replaced[0]} -> {report.head_replaced[1]} classes, freshly initialized")
    if report.dropout_removed:
        lines.append(f"dropout    {report.dropout_removed} Dropout node(s) removed (training is deterministic and resumable)")
    if report.frozen_bn_rewritten:
        lines.append(
            f"batchnorm  {report.frozen_bn_rewritten} inference-mode BatchNorm node(s) rewritten as affine ops (running statistics frozen)"
        )
    if report.unreached:
        shown = ", ".join(report.unreached[:4]) + (f" and {len(report.unreached) - 4} more" if len(report.unreached) > 4 else "")
        lines.append(f"unused     the loss does not depend on {shown}: their gradient is 0")
    return "\n".join(lines)


def train_summary(result, with_table: bool = True) -> str:
    """The result table of a run (every epoch, unless it was shown live), then the numbers that matter."""
    rows = [
        (
            int(r[metrics.EPOCH]),
            float(r[metrics.LR]),
            float(r[metrics.TRAIN_LOSS]),
            float(r[metrics.TRAIN_TOP1]),
            float(r[metrics.VAL_TOP1]),
            float(r[metrics.TEST_TOP1]),
            int(r[metrics.UPDATED_PARAMS]),
            int(r[metrics.SELECTED_NEURONS]),
        )
        for r in result.rows
    ]
    b = result.budget
    lines = (
        [table(rows, ("epoch", "lr", "train loss", "train top1", "val top1", "test top1", "updated", "neurons")), ""] if with_table else []
    )
    lines += [
        f"budget        {b.describe()}",
        f"best val      epoch {result.best_epoch}: val top-1 {result.best_val:.4f}, test top-1 {result.test_at_best_val:.4f}",
        f"final         test top-1 {float(result.rows[-1][metrics.TEST_TOP1]):.4f}" if result.rows else "final         no epoch ran",
        f"run           {result.run_dir}/ (metrics.csv, masks/, model.onnx = weights of the best val epoch)",
    ]
    lines += [f"warning       {w}" for w in result.warnings]
    return "\n".join(lines)


def prune_summary(result) -> str:
    """The rounds of a prune (training/prune.py PruneResult), then its dense and pruned models side by side."""
    from onnx_neq.results.model_compare import compare_models

    rounds = [
        (int(r["round"]), f"{float(r['target_sparsity']):.2%}", f"{float(r['sparsity']):.2%}", int(r["nonzero"]),
         int(r["identity_layers"]), int(r["constant_layers"]), f"{float(r['test_top1']):.2%}")
        for r in result.rows
    ]  # fmt: skip
    models = {"dense (round 0)": result.out / "round_00" / "run" / "model.onnx", "pruned": result.model}
    top1 = {"dense (round 0)": result.rows[0]["test_top1"], "pruned": result.rows[-1]["test_top1"]}
    if result.folded is not None:
        models["pruned, layers folded"], top1["pruned, layers folded"] = result.folded, result.folded_top1
    facts = [
        (f.name, f.conv_layers, f.nodes, f.nonzero, f"{f.file_bytes / 1e6:.2f} MB", f"{f.macs / 1e6:.1f}M", f"{f.nonzero_macs / 1e6:.1f}M",
         f"{f.latency_ms:.3f}", f"{float(top1[f.name]):.2%}")
        for f in compare_models(models)
    ]  # fmt: skip
    last = result.rows[-1]
    short = float(last["sparsity"]) < float(last["target_sparsity"]) - 1e-3
    note = ["the target was not reached: every prunable layer left has zero entropy (always ON or OFF) or no weight left", ""]
    return "\n".join(
        [
            table(rounds, ("round", "target", "sparsity", "non-zero", "identity layers", "constant layers", "test top-1")),
            *(note if short else [""]),
            table(facts, ("model", "convs", "nodes", "non-zero params", "file", "MACs", "non-zero MACs", "latency ms", "test top-1")),
            "",
            "latency: median of 200 single-image runs, the models interleaved, one thread; onnxruntime's dense kernels"
            " do not skip zero weights, so sparsity alone does not shorten it (non-zero MACs: what a sparse kernel would compute)",
            f"wrote {result.out}/ (rounds.csv, round_*/, model.onnx{', model_folded.onnx' if result.folded else ''}, fold.json)",
        ]
    )


def fleet_summary(rows: list[dict], out: Path) -> str:
    """Per round of a fleet (rounds.csv rows): clients that replied, updates merged, bytes on the wire, global top-1."""
    table_rows = []
    for round_ in sorted({int(r["round"]) for r in rows}):
        mine = [r for r in rows if int(r["round"]) == round_ and r["client"] != "-"]
        merged = [r for r in mine if not r["note"]]
        sent = sum(int(r["bytes_sent"]) for r in merged)
        top1 = next(r["global_top1"] for r in rows if int(r["round"]) == round_)
        table_rows.append(
            (round_, len(mine), len(merged), f"{sent / 1e6:.3f} MB", f"{sent / max(len(merged), 1) / 1e3:.1f} kB", f"{float(top1):.2%}")
        )
    notes = [f"round {r['round']}, client {r['client']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(
        [
            table(table_rows, ("round", "clients", "merged", "sent", "sent per client", "global top-1")),
            *notes,
            f"wrote {out}/ (rounds.csv, model.onnx, global.npz); `onnx-neq eval {out}/model.onnx --data ...` scores the global model",
        ]
    )
