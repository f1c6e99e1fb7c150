"""Portable training models: ORT's training graph rewritten into standard ONNX (opset 17) for stock onnxruntime.

The public surface other graph modules use (specialize.py, gradients/builder.py): `lower_training_model`
(a whole ORT training graph), `lower_graph` (its steps on a graph already rewritten, with per-node rule
overrides), `refuse_unknown`, `static_shapes`, `is_accumulator`, `accumulated_param`, `live_nodes`, `NameSource`, `is_standard`, the registry
`RULES`, and the constants ACCUMULATOR, BUFFER_SUFFIX, OPSET and IR_VERSION.
"""

from onnx_neq.graph.lowering.lower import (
    ACCUMULATOR,
    BUFFER_SUFFIX,
    IR_VERSION,
    OPSET,
    LoweringReport,
    NameSource,
    accumulated_param,
    is_accumulator,
    is_standard,
    live_nodes,
    lower_graph,
    lower_training_model,
    refuse_unknown,
    static_shapes,
)
from onnx_neq.graph.lowering.rules import RULES

__all__ = [
    "ACCUMULATOR",
    "BUFFER_SUFFIX",
    "IR_VERSION",
    "OPSET",
    "RULES",
    "LoweringReport",
    "NameSource",
    "accumulated_param",
    "is_accumulator",
    "is_standard",
    "live_nodes",
    "lower_graph",
    "lower_training_model",
    "refuse_unknown",
    "static_shapes",
]
