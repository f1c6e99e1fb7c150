"""BatchNormStatisticsPass: expose each training-mode BatchNorm's batch statistics as training outputs.

Before:  Y, _, _, mean, inv_std = BatchNormInternal(X, scale, B, running_mean, running_var)
         outputs: loss, logits, gradients
After:   the same node; outputs: loss, logits, gradients, mean, inv_std   (one pair per BatchNorm)

ORT's on-device training never updates running statistics (the exporter traced BatchNorm with
momentum 0). The training loop reads these outputs after each step and updates the running
statistics on the host as PyTorch's train mode does (momentum 0.1, unbiased batch variance), so
evaluation uses statistics of the target data. Runs on the training model of generate_artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from onnx_neq.graph.passes._result import ReportedResult

TRAINING_BN = ("BatchNormInternal",)


@dataclass(frozen=True)
class BatchNormStatisticsReport:
    stats: tuple[dict, ...]  # per exposed BatchNorm: running_mean, running_var, batch_mean, batch_inv_std, epsilon, positions


class BatchNormStatisticsPass(ir.passes.InPlacePass):
    def __init__(self, positions: dict[str, int]):
        """positions: running_mean initializer name -> H*W of that BatchNorm's input."""
        super().__init__()
        self.positions = positions

    def call(self, model: ir.Model) -> ReportedResult[BatchNormStatisticsReport]:
        graph = model.graph
        stats = []
        for node in graph:
            if node.op_type not in TRAINING_BN or len(node.outputs) < 5 or len(node.inputs) < 5:
                continue
            mean, inv_std = node.outputs[3], node.outputs[4]
            running_mean, running_var = node.inputs[3].name, node.inputs[4].name
            if not mean.name or not inv_std.name or running_mean not in self.positions:
                continue
            graph.outputs.extend([mean, inv_std])
            stats.append(
                {
                    "running_mean": running_mean,
                    "running_var": running_var,
                    "batch_mean": mean.name,
                    "batch_inv_std": inv_std.name,
                    "epsilon": float(node.attributes["epsilon"].value) if "epsilon" in node.attributes else 1e-5,
                    "positions": self.positions[running_mean],
                }
            )
        return ReportedResult(model, bool(stats), BatchNormStatisticsReport(tuple(stats)))


def training_bn_positions(model: ir.Model) -> dict[str, int]:
    """running_mean name -> H*W of the input, for every training-mode BatchNormalization of a forward model
    whose shapes onnx's shape inference has filled in (where a spatial dim is unknown, none)."""
    out = {}
    for node in model.graph:
        if node.op_type != "BatchNormalization" or node.attributes.get_int("training_mode", 0) != 1:
            continue
        shape = node.inputs[0].shape if node.inputs[0] is not None else None
        dims = [d if isinstance(d, int) else 0 for d in shape] if shape is not None else []  # 0: unknown, as onnx writes it
        if len(dims) >= 2 and all(d > 0 for d in dims[2:]):
            positions = 1
            for d in dims[2:]:
                positions *= d
            out[node.inputs[3].name] = positions
    return out
