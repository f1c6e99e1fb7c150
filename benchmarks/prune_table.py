"""The pruning table of BENCHMARKS.md from `onnx-neq prune` output folders (docs/benchmarks/prune.md).

    python benchmarks/prune_table.py benchmarks/prune/runs

Folders are named MODEL-METHOD-seedN. Per model, method and round (sparsity 1 - 0.5^round): the layers
whose activation is the identity or a constant on the training data (rounds.csv; the authors' count of
removable layers) and test top-1 at the round's best validation epoch, as means with the half-width of
their 95% Student-t interval over seeds. Then, per folder, the last round's model against the same with
those layers folded out: convs, nodes, non-zero parameters and median latency (onnxruntime, one image,
the two models interleaved in one process).
"""

from __future__ import annotations

import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

from onnx_neq.results.model_compare import compare_models
from onnx_neq.results.statistics import mean_ci_text as _cell

ROUNDS = (0, 1, 2, 4, 6)  # dense, 50%, 75%, 93.75%, 98.4%


def _rows(folder: Path) -> list[dict]:
    with open(folder / "rounds.csv", newline="") as f:
        return list(csv.DictReader(f))


def accuracy_table(folders: list[Path]) -> str:
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for folder in folders:
        model, method, _ = re.fullmatch(r"(.+)-(egp|magnitude)-seed(\d+)", folder.name).groups()
        for row in _rows(folder):
            cells[(model, method, int(row["round"]))].append(row)
    lines = [
        "| model | method | round: target sparsity | reached | removable layers | test top-1 (%) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, method, r), rows in sorted(cells.items()):
        if r not in ROUNDS:
            continue
        removable = [int(x["identity_layers"]) + int(x["constant_layers"]) for x in rows]
        top1 = [float(x["test_top1"]) for x in rows]
        target = f"{r}: {float(rows[0]['target_sparsity']):.1%}" if r else "0: dense"
        reached = _cell([float(x["sparsity"]) for x in rows], 100, 1)
        lines.append(f"| {model} | {method} | {target} | {reached} | {_cell(removable)} | {_cell(top1, 100, 2)} | {len(rows)} |")
    return "\n".join(lines)


def folding_table(folders: list[Path]) -> str:
    lines = [
        "| run | sparsity | convs | nodes | non-zero params | latency ms (pruned -> folded) | folded / pruned |",
        "|---|---|---|---|---|---|---|",
    ]
    for folder in folders:
        if not (folder / "model_folded.onnx").exists():
            lines.append(f"| {folder.name} | {float(_rows(folder)[-1]['sparsity']):.1%} | no layer removable | | | | |")
            continue
        pruned, folded = compare_models({"pruned": folder / "model.onnx", "folded": folder / "model_folded.onnx"}, repeats=300)
        lines.append(
            f"| {folder.name} | {float(_rows(folder)[-1]['sparsity']):.1%} | {pruned.conv_layers} -> {folded.conv_layers}"
            f" | {pruned.nodes} -> {folded.nodes} | {pruned.nonzero:,} -> {folded.nonzero:,}"
            f" | {pruned.latency_ms:.3f} -> {folded.latency_ms:.3f} | {folded.latency_ms / pruned.latency_ms:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    folders = sorted(p.parent for root in argv for p in Path(root).glob("*/rounds.csv"))
    print(accuracy_table(folders))
    print()
    print(folding_table(folders))


if __name__ == "__main__":
    main(sys.argv[1:])
