"""ActivationInputPass: expose the input of the activation that follows each conv, for the pruning entropy.

Before:  Y = Conv(X, W); Z = BatchNorm(Y) (a node, or per-channel Sub/Mul/Div/Add); A = Relu(Z)
After:   the same, and Identity(Z) as an output named "<layer>.neq_act"

A conv is paired with the first activation its output reaches through per-channel ops only (BatchNorm in
either form, Identity, and an Add of another branch: a residual block's last conv pairs with the ReLU after
the sum, as Entropy-Guided Pruning pairs it). Relu and LeakyRelu are ON where their input is above 0; Clip
(ReLU6) where it lies strictly between its bounds (where the activation passes its input on, slope 1: a
layer whose channels are all always ON acts as the identity there). A conv whose output reaches no such
activation, or branches first, or reads a value another path reads too and meets it at an Add (a
downsample conv on a residual shortcut) is not paired: pruning leaves it.
The eval graph's activation taps (graph outputs) do not count as branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_neq.graph.passes._result import ReportedResult
from onnx_neq.graph.passes._splice import splice

ACT_SUFFIX = ".neq_act"
ACTIVATIONS = ("Relu", "LeakyRelu", "Clip")
PER_CHANNEL = ("BatchNormalization", "Identity", "Sub", "Mul", "Div", "Add")


@dataclass(frozen=True)
class PairedActivation:
    layer: str
    output: str  # "<layer>.neq_act": the activation's input, added as a graph output
    op: str
    low: float  # ON: low < x (< high)
    high: float
    residual: bool  # an Add of another branch lies between the conv and the activation


@dataclass(frozen=True)
class ActivationInputReport:
    paired: tuple[PairedActivation, ...]  # in layer order
    unpaired: tuple[str, ...]  # layers that reach no activation through per-channel ops


class ActivationInputPass(ir.passes.InPlacePass):
    """`layers`: objects with `.name` and `.weight` (the conv weight's name): manifest layers or ConvLayers;
    `data_input`: the image input's name (an Add whose other operand depends on it joins another branch);
    `values`: parameters fed at run time, where Clip's bounds may live (the eval graph lifts constants)."""

    def __init__(self, layers: list, data_input: str, values: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.layers, self.data_input, self.values = layers, data_input, values or {}

    def call(self, model: ir.Model) -> ReportedResult[ActivationInputReport]:
        graph = model.graph
        outputs = {v.name for v in graph.outputs}
        convs = {node.inputs[1].name: node for node in graph if node.op_type == "Conv" and len(node.inputs) > 1 and node.inputs[1]}
        paired, unpaired = [], []
        for layer in self.layers:
            conv = convs.get(layer.weight)
            found = _activation(conv.outputs[0], outputs, self.data_input) if conv is not None else None
            if found is None or (found[1] and _branches(conv.inputs[0], outputs)):  # a shortcut conv (downsample)
                unpaired.append(layer.name)
                continue
            node, residual = found
            source, weight_shape = node.inputs[0], conv.inputs[1].shape
            shape = source.shape or (ir.Shape([None] * len(weight_shape)) if weight_shape is not None else None)  # N, C, spatial
            tap = ir.Value(name=layer.name + ACT_SUFFIX, type=source.type or ir.TensorType(ir.DataType.FLOAT), shape=shape)
            tape = ir.tape.Tape()
            tape.op("Identity", [source], name=tap.name, output=tap)
            splice(graph, tape, before=node)
            graph.outputs.append(tap)
            outputs.add(tap.name)
            low, high = _bounds(node, self.values)
            paired.append(PairedActivation(layer.name, tap.name, node.op_type, low, high, residual))
        return ReportedResult(model, bool(paired), ActivationInputReport(tuple(paired), tuple(unpaired)))


def _activation(value: ir.Value, graph_outputs: set[str], data_input: str) -> tuple[ir.Node, bool] | None:
    """The activation `value` reaches through per-channel ops with one consumer each, and whether an Add of
    another branch lies on the way; None when it branches or meets another op first."""
    residual = False
    while True:
        consumers = _consumers(value, graph_outputs)
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op_type in ACTIVATIONS:
            return node, residual
        if node.op_type not in PER_CHANNEL:
            return None
        if node.op_type == "Add" and any(_depends_on(i, data_input) for i in node.inputs if i is not value):
            residual = True
        value = node.outputs[0]


def _depends_on(value: ir.Value | None, data_input: str) -> bool:
    """True when `value` is computed from the graph input `data_input` (not only from parameters and constants)."""
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.name == data_input:
            return True
        producer = v.producer()
        if producer is not None:
            stack.extend(producer.inputs)
    return False


def _branches(value: ir.Value, graph_outputs: set[str]) -> bool:
    """True when `value` feeds more than one node (taps aside): a conv reading it sits beside another path."""
    return len(_consumers(value, graph_outputs)) > 1


def _consumers(value: ir.Value, graph_outputs: set[str]) -> list[ir.Node]:
    """The nodes reading `value`, the eval graph's taps (an Identity into a graph output) aside."""
    return [n for n in value.consumers() if not (n.op_type == "Identity" and all(o.name in graph_outputs for o in n.outputs))]


def _bounds(node: ir.Node, values: dict[str, np.ndarray]) -> tuple[float, float]:
    """Where the activation passes its input on: (0, inf) for Relu/LeakyRelu, Clip's (min, max)."""
    if node.op_type != "Clip":
        return 0.0, float("inf")
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11
        return node.attributes.get_float("min", -np.inf), node.attributes.get_float("max", np.inf)
    bounds = [_constant(node.inputs[i], values) if len(node.inputs) > i and node.inputs[i] is not None else None for i in (1, 2)]
    low, high = (float(np.asarray(b).reshape(-1)[0]) if b is not None and np.size(b) == 1 else None for b in bounds)
    return (-np.inf if low is None else low), (np.inf if high is None else high)


def _constant(value: ir.Value | None, values: dict[str, np.ndarray] | None = None) -> np.ndarray | None:
    """The value of an initializer, a Constant node's output or a fed parameter; None when it is computed."""
    if value is None:
        return None
    if values and value.name in values:
        return np.asarray(values[value.name])
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None
