"""Find the selectable neurons of a model: one per output channel of every Conv.

Cost of neuron c of a Conv with weight [C_out, C_in/groups, kh, kw] is C_in/groups*kh*kw,
plus 1 if the conv has a bias (docs/ALGORITHM.md, "Neurons and costs").
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from onnx_neq.errors import NeqError

MASK_SUFFIX = ".neq_mask"  # never ends in "_grad": ORT would take it for a gradient buffer
TAP_SUFFIX = ".neq_tap"


@dataclass(frozen=True)
class ConvLayer:
    name: str
    node: str
    weight: str
    bias: str | None
    kind: str  # conv | depthwise | grouped
    out_channels: int
    in_channels: int
    groups: int
    kernel: tuple[int, ...]
    neuron_cost: int
    output: str  # the raw Conv output value in the forward graph

    @property
    def mask_input(self) -> str:
        return self.name + MASK_SUFFIX

    @property
    def tap_output(self) -> str:
        return self.name + TAP_SUFFIX

    @property
    def params(self) -> int:
        return self.out_channels * self.neuron_cost


_SHAPE_ONLY = {"Identity", "Flatten", "Reshape", "Squeeze"}
_HEAD_PATH = {"GlobalAveragePool", "AveragePool", "ReduceMean", "Relu"}


def keeps_values(node: ir.Node) -> bool:
    """Identity / Flatten / Reshape / Squeeze, or a Cast to the type it reads: the values pass
    through unchanged (only their shape may change), so a classifier or a Softmax is found behind them."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Cast":
        source = node.inputs[0]
        return source is not None and source.dtype is not None and node.attributes.get_int("to", 0) == source.dtype.value
    return node.op_type in _SHAPE_ONLY


def find_head_conv(model: ir.Model) -> ir.Node | None:
    """A 1x1 Conv that is the classifier (SqueezeNet-style: Conv 1x1 -> [Relu] -> pool -> output)."""
    value = model.graph.outputs[0]
    while value.producer() is not None and (keeps_values(value.producer()) or value.producer().op_type in _HEAD_PATH):
        value = value.producer().inputs[0]
    node = value.producer()
    if node is None or node.op_type != "Conv":
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or tuple(weight.const_value.shape[2:]) != (1, 1):
        return None
    return node


def find_conv_layers(model: ir.Model) -> list[ConvLayer]:
    """Every Conv of the main graph, in graph order, as a layer of selectable neurons; a 1x1 Conv
    classifier head is not one (it is the classifier: always trained, never budgeted)."""
    head = find_head_conv(model)
    convs = [n for n in model.graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx") and n is not head]
    layers = [_layer(node) for node in convs]
    _check_unique(layers)
    return layers


def _layer(node: ir.Node) -> ConvLayer:
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or not weight.is_initializer():
        raise NeqError(
            f"Conv '{node.name}' has no initializer weight (its weight is computed in the graph); re-export the model with its weights stored as initializers"
        )
    shape = tuple(weight.const_value.shape)
    if len(shape) < 3:
        raise NeqError(f"Conv '{node.name}' has a weight of shape {shape}; expected [C_out, C_in/groups, k...]")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not bias.is_initializer():
        raise NeqError(f"Conv '{node.name}' has a bias that is not an initializer; re-export with its bias stored as an initializer")
    groups = node.attributes.get_int("group", 1)
    c_out, c_in_per_group, kernel = shape[0], shape[1], shape[2:]
    cost = c_in_per_group * _prod(kernel) + (1 if bias is not None else 0)
    return ConvLayer(
        name=_layer_name(node, weight),
        node=node.name or weight.name,
        weight=weight.name,
        bias=bias.name if bias is not None else None,
        kind=_kind(groups, c_in_per_group, c_out),
        out_channels=c_out,
        in_channels=c_in_per_group * groups,
        groups=groups,
        kernel=tuple(kernel),
        neuron_cost=cost,
        output=node.outputs[0].name,
    )


def _kind(groups: int, c_in_per_group: int, c_out: int) -> str:
    if groups == 1:
        return "conv"
    if c_in_per_group == 1 and c_out % groups == 0:
        return "depthwise"
    return "grouped"


def _layer_name(node: ir.Node, weight: ir.Value) -> str:
    name = weight.name
    return name[: -len(".weight")] if name.endswith(".weight") else (node.name or name)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _check_unique(layers: list[ConvLayer]) -> None:
    seen: dict[str, str] = {}
    for layer in layers:
        if layer.weight in seen:
            raise NeqError(
                f"Convs '{seen[layer.weight]}' and '{layer.node}' share the weight '{layer.weight}'; onnx-neq needs one weight per Conv"
            )
        seen[layer.weight] = layer.node
