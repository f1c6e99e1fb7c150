"""The fleet benchmark of BENCHMARKS.md (docs/benchmarks/fleet.md): 10 simulated clients on a Dirichlet(0.5) split of
Fashion-MNIST classes 5-9, from the shipped model, one `onnx-neq fleet simulate` per federation and seed.

    python benchmarks/fleet_bench.py OUT [--seeds 0,1,2] [--rounds 3] [--federations fedavg,mixed]

Federations (the seeds outermost, so that each seed's federations run one after the other in one stretch):
    fedavg            full fine-tuning, every trainable parameter sent (dense FedAvg)
    dense-8.8         8.8% budget (velocity selector: random in round 1, then the velocity each client keeps), all sent
    channels-8.8      8.8% budget, the trained channels' rows sent
    dense-30.8, channels-30.8
    mixed             clients 0-4 at 8.8%, clients 5-9 at 30.8%, channels sent
A federation already complete in OUT is skipped; one interrupted continues (the same command resumes).
Then `python benchmarks/fleet_table.py OUT` writes the table and the plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COMMON = ["--data", "fashion-mnist@5-9", "--clients", "10", "--split", "dirichlet:0.5", "--train-limit", "300", "--epochs", "1"]
BUDGETED = ["--selector", "velocity"]
FEDERATIONS = {
    "fedavg": ["--selector", "full", "--send", "dense"],
    "dense-8.8": [*BUDGETED, "--budget-ratio", "0.088", "--send", "dense"],
    "channels-8.8": [*BUDGETED, "--budget-ratio", "0.088", "--send", "channels"],
    "dense-30.8": [*BUDGETED, "--budget-ratio", "0.308", "--send", "dense"],
    "channels-30.8": [*BUDGETED, "--budget-ratio", "0.308", "--send", "channels"],
    "mixed": [*BUDGETED, "--client-config", "0-4: budget-ratio=0.088; 5-9: budget-ratio=0.308", "--send", "channels"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--federations", default=",".join(FEDERATIONS), help="a comma-separated subset, in this order")
    args = parser.parse_args()
    for seed in map(int, args.seeds.split(",")):
        for name in args.federations.split(","):
            options = FEDERATIONS[name]
            out = args.out / f"{name}-s{seed}"
            state = out / "state.json"
            if state.exists() and json.loads(state.read_text())["round"] >= args.rounds:
                continue
            command = [
                "onnx-neq",
                "fleet",
                "simulate",
                *COMMON,
                *options,
                "--rounds",
                str(args.rounds),
                "--seed",
                str(seed),
                "--out",
                str(out),
            ]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True, stdout=sys.stdout, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
