"""ActivationTapPass: expose the raw output of every Conv as an output of the eval graph.

Before:  Y = Conv(X, W)            outputs: loss, logits
After:   Y = Conv(X, W); T = Identity(Y)   outputs: loss, logits, T (named "<layer>.neq_tap")

The velocity computation reads these taps (pre-BatchNorm, pre-activation outputs).
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_neq.errors import NeqError
from onnx_neq.graph.conv_layers import ConvLayer


class ActivationTapPass(ir.passes.InPlacePass):
    def __init__(self, layers: list[ConvLayer]):
        super().__init__()
        self.layers = layers
        self.taps: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        producers = {out.name: (node, out) for node in graph for out in node.outputs}
        for layer in self.layers:
            if layer.output not in producers:
                raise NeqError(f"the eval graph lost the output of Conv '{layer.node}'")
            node, value = producers[layer.output]
            identity = ir.node("Identity", [value], name=layer.tap_output)
            identity.outputs[0].name = layer.tap_output
            identity.outputs[0].type = value.type or ir.TensorType(node.inputs[0].dtype or ir.DataType.FLOAT)
            identity.outputs[0].shape = value.shape or ir.Shape([None, layer.out_channels] + [None] * len(layer.kernel))
            graph.insert_after(node, identity)
            graph.outputs.append(identity.outputs[0])
            self.taps.append(layer.tap_output)
        return ir.passes.PassResult(model, modified=bool(self.layers))
