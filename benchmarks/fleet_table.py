"""The fleet table and plot of BENCHMARKS.md from benchmarks/fleet_bench.py's folders (docs/benchmarks/fleet.md).

    python benchmarks/fleet_table.py OUT        (OUT/NAME-sSEED/rounds.csv, as fleet_bench.py writes them)

Per federation, means with the half-width of their 95% Student-t interval over seeds:
    sent/client-round  the bytes of one client's update (rounds.csv bytes_sent; updates merged only)
    vs FedAvg          that as a ratio to dense FedAvg's update of the same seed
    top-1 round N      the global model's test top-1 after each round (round 0: the shipped model)
    vs dense           last round's top-1 minus that of the same budget sent dense, same seed (points)
Writes OUT/fleet.md (the table) and OUT/fleet_top1_vs_bytes.png (top-1 against cumulative bytes sent by all
clients, mean over seeds).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from onnx_neq.results.statistics import mean_ci_text as _cell

ORDER = ["fedavg", "dense-8.8", "channels-8.8", "dense-30.8", "channels-30.8", "mixed"]
LABELS = {
    "fedavg": "dense FedAvg (full fine-tuning, all sent)",
    "dense-8.8": "8.8% budget, dense updates",
    "channels-8.8": "8.8% budget, channel-sparse updates",
    "dense-30.8": "30.8% budget, dense updates",
    "channels-30.8": "30.8% budget, channel-sparse updates",
    "mixed": "mixed: 5 clients 8.8%, 5 clients 30.8%, channel-sparse",
}
DENSE_OF = {"channels-8.8": "dense-8.8", "channels-30.8": "dense-30.8"}


def _read(path: Path) -> dict:
    with open(path / "rounds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rounds = sorted({int(r["round"]) for r in rows})
    top1 = [float(next(r for r in rows if int(r["round"]) == k)["global_top1"]) for k in rounds]
    merged = [r for r in rows if r["client"] != "-" and not r["note"]]
    per_round = [sum(int(r["bytes_sent"]) for r in merged if int(r["round"]) == k) for k in rounds]
    return {"top1": top1, "per_update": np.mean([int(r["bytes_sent"]) for r in merged]), "cumulative": np.cumsum(per_round)}


def collect(out: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(out.glob("*-s*")):
        if (path / "rounds.csv").exists():
            name, seed = path.name.rsplit("-s", 1)
            runs[name][int(seed)] = _read(path)
    return runs


def table(runs: dict[str, dict[int, dict]]) -> str:
    rounds = min(len(r["top1"]) for fed in runs.values() for r in fed.values())
    head = ["federation", "seeds", "sent/client-round (kB)", "vs FedAvg", *(f"top-1 r{k} (%)" for k in range(1, rounds)), "vs dense (pts)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fedavg = runs.get("fedavg", {})
    for name in [n for n in ORDER if n in runs]:
        seeds = runs[name]
        ratio = [seeds[s]["per_update"] / fedavg[s]["per_update"] for s in seeds if s in fedavg]
        dense = runs.get(DENSE_OF.get(name, ""), {})
        gap = [seeds[s]["top1"][rounds - 1] - dense[s]["top1"][rounds - 1] for s in seeds if s in dense]
        cells = [
            LABELS[name], str(len(seeds)), _cell([r["per_update"] for r in seeds.values()], 1e-3, 1), _cell(ratio, 1, 3),
            *(_cell([r["top1"][k] for r in seeds.values()], 100, 1) for k in range(1, rounds)),
            _cell(gap, 100, 1) if gap else "",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    start = [r["top1"][0] for fed in runs.values() for r in fed.values()]
    lines.append(f"\nround 0 (the shipped model, before any round): {100 * float(np.mean(start)):.1f}% top-1")
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in [n for n in ORDER if n in runs]:
        seeds = list(runs[name].values())
        n = min(len(r["top1"]) for r in seeds)
        x = np.mean([r["cumulative"][:n] for r in seeds], axis=0) / 1e6
        y = np.mean([r["top1"][:n] for r in seeds], axis=0) * 100
        ax.plot(x, y, marker="o", label=LABELS[name])
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("cumulative bytes sent by all clients (MB)")
    ax.set_ylabel("global test top-1 (%)")
    ax.set_title("10 clients, Dirichlet(0.5) split of Fashion-MNIST 5-9\n(mean over seeds; a dot per round, round 0 at 0)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    out = Path(sys.argv[1])
    runs = collect(out)
    text = table(runs)
    (out / "fleet.md").write_text(text + "\n")
    plot(runs, out / "fleet_top1_vs_bytes.png")
    print(text)
    print(f"wrote {out / 'fleet.md'}, {out / 'fleet_top1_vs_bytes.png'}")


if __name__ == "__main__":
    main()
