"""ActivationTapPass: expose the raw output of every Conv as an output of the eval graph.

Before:  Y = Conv(X, W)            outputs: loss, logits
After:   Y = Conv(X, W); T = Identity(Y)   outputs: loss, logits, T (named "<layer>.neq_tap")

The velocity computation reads these taps (pre-BatchNorm, pre-activation outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from onnx_neq.errors import NeqError
from onnx_neq.graph.conv_layers import ConvLayer
from onnx_neq.graph.passes._result import ReportedResult
from onnx_neq.graph.passes._splice import splice


@dataclass(frozen=True)
class ActivationTapReport:
    taps: tuple[str, ...]  # the tap outputs added, in layer order


class ActivationTapPass(ir.passes.InPlacePass):
    def __init__(self, layers: list[ConvLayer]):
        super().__init__()
        self.layers = layers

    def call(self, model: ir.Model) -> ReportedResult[ActivationTapReport]:
        graph = model.graph
        producers = {out.name: (node, out) for node in graph for out in node.outputs}
        taps = []
        for layer in self.layers:
            if layer.output not in producers:
                raise NeqError(f"the eval graph lost the output of Conv '{layer.node}'")
            node, value = producers[layer.output]
            tap = ir.Value(
                name=layer.tap_output,
                type=value.type or ir.TensorType(node.inputs[0].dtype or ir.DataType.FLOAT),
                shape=value.shape or ir.Shape([None, layer.out_channels] + [None] * len(layer.kernel)),
            )
            tape = ir.tape.Tape()
            tape.op("Identity", [value], name=layer.tap_output, output=tap)
            splice(graph, tape, after=node)
            graph.outputs.append(tap)
            taps.append(layer.tap_output)
        return ReportedResult(model, bool(taps), ActivationTapReport(tuple(taps)))
