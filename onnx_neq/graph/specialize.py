"""Training graphs specialised to one epoch's selection: the backward pass costs what the budget buys.

The masked training graph (portable_training_model.onnx) computes every gradient and multiplies the
unselected channels' by 0. `specialize` rewrites ORT's training graph (training_model.onnx, before
lowering) for a tuple of per-layer states instead, then lowers it to standard ONNX (opset 17):

  none  the layer's dW/dB are not computed and not output;
  all   `<weight>_grad` / `<bias>_grad` in full (the mask is 1);
  some  an int64 input `<layer>.neq_channels` [k] (any k >= 1, the selected output channels) and
        gradients [k, ...] computed for those channels only (lowering/conv_grad.py: dY gathered before the
        swapped-roles Conv / MatMul of regular convs; depthwise convs gather X too and correlate tap by tap,
        as a Conv's `group` cannot follow a dynamic k; other grouped convs compute the full dW and Gather
        its rows). dB = ReduceSum of the gathered dY.

Mask inputs are gone. Classifier and "other" always-trained parameters keep full gradients. BatchNorm
scale/bias are matched to the conv whose output the BN consumes (a training-mode BatchNormInternal's
inputs 1 and 2, or, for frozen BN, BatchNormAffinePass's Sub(conv, mean) -> Mul(., Reshape(Div(scale, std)))
-> Add(., Reshape(bias))): with bn_update="always" they keep full gradients (so the backward reaches the
stem), with "selected" they follow their conv: none -> no gradient, all -> full, some -> the full dScale /
dBias gathered by the same `<layer>.neq_channels`.

Once the unneeded gradient outputs are gone, dead-node elimination stops the backward at the shallowest
conv that still needs a gradient (its ConvGrad computes no dX). One specialised graph serves every
selection with the same states; `layer_states` gives the states of a set of masks and `channel_inputs`
the index feeds.

`training_graph_from_portable` rebuilds that ORT training graph from portable_training_model.onnx (each
conv's lowered ConvGrad nodes raised back to one ConvGrad, accumulators around the gradient outputs), so
the portable backends specialise from the files a board holds; specialising it equals specialising ORT's
training_model.onnx (tests/backends/test_board_files.py).
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_neq.errors import NeqError
from onnx_neq.graph.lowering import (
    ACCUMULATOR,
    BUFFER_SUFFIX,
    accumulated_param,
    is_accumulator,
    live_nodes,
    lower_graph,
    refuse_unknown,
    static_shapes,
)
from onnx_neq.graph.lowering.conv_grad import lower_conv_grad
from onnx_neq.graph.lowering.rules import Rule
from onnx_neq.manifest import Layer, Manifest, artifact_model

STATES = ("none", "some", "all")
BN_UPDATES = ("always", "selected")
MS = "com.microsoft"


@dataclass
class LayerSpec:
    """One conv layer in a specialised graph. MACs are per image; dW of a "some" layer costs
    `dw_macs_per_channel` per selected channel (grouped convs: the full dW, in `dw_macs`)."""

    state: str
    out_channels: int
    gradient_outputs: list[str] = field(default_factory=list)
    channels_input: str | None = None
    bn_params: list[str] = field(default_factory=list)
    dx_macs: int = 0
    dw_macs: int = 0
    dw_macs_per_channel: int = 0


@dataclass
class SpecializeReport:
    states: dict[str, str]
    bn_update: str
    layers: dict[str, LayerSpec]
    gradient_outputs: list[tuple[str, list[int | str]]]  # (name, shape); "<layer>.k" is the symbolic k
    channel_inputs: list[str]
    nodes: int
    other_backward_macs: int  # Gemm/MatMul gradients (classifier) per image
    build_seconds: float = 0.0

    def backward_macs(self, selected: dict[str, int] | None = None) -> int:
        """Backward MACs per image: dX ConvTransposes, dW Convs/MatMuls, the classifier's gradients.
        `selected`: layer -> k for "some" layers (absent: k = all channels, an upper bound)."""
        total = self.other_backward_macs
        for name, spec in self.layers.items():
            total += spec.dx_macs + spec.dw_macs
            if spec.dw_macs_per_channel:
                k = (selected or {}).get(name)
                total += spec.dw_macs_per_channel * (k if k is not None else spec.out_channels)
        return total


CHANNELS_SUFFIX = ".neq_channels"  # the int64 input of the selected channels of a partly selected layer


def _count_dim(channels_input: str) -> str:
    """The symbolic dim of a `<layer>.neq_channels` input: its number of channels, `<layer>.k`."""
    return channels_input[: -len(CHANNELS_SUFFIX)] + ".k"


def channels_input_name(layer: Layer) -> str:
    """`<layer>.neq_channels`."""
    return f"{layer.name}{CHANNELS_SUFFIX}"


def layer_states(manifest: Manifest, masks: dict[str, np.ndarray]) -> dict[str, str]:
    """layer -> "none" (no channel selected) | "some" | "all" (every channel). A layer without a mask
    counts as "all" (the portable backend's default mask is all ones)."""
    states = {}
    for layer in manifest.layers:
        mask = masks.get(layer.name)
        if mask is None:
            states[layer.name] = "all"
            continue
        mask = np.asarray(mask).reshape(-1)
        if mask.shape != (layer.out_channels,):
            raise NeqError(f"mask for {layer.name} has {mask.size} entries; the layer has {layer.out_channels} channels")
        on = int(np.count_nonzero(mask))
        states[layer.name] = "none" if on == 0 else "all" if on == layer.out_channels else "some"
    return states


def channel_inputs(manifest: Manifest, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `<layer>.neq_channels` feeds (int64 indices of the non-zero mask entries) of the "some" layers."""
    states = layer_states(manifest, masks)
    return {
        channels_input_name(layer): np.flatnonzero(np.asarray(masks[layer.name]).reshape(-1)).astype(np.int64)
        for layer in manifest.layers
        if states[layer.name] == "some"
    }


def specialize(
    training_model: onnx.ModelProto, manifest: Manifest, states: dict[str, str], bn_update: str = "always"
) -> tuple[onnx.ModelProto, SpecializeReport]:
    """The standard-ONNX training model of ORT training graph `training_model` (masks applied by prepare)
    specialised to `states` (layer -> none|some|all), and a report. See the module docstring."""
    started = time.perf_counter()
    cut = _cut(training_model, manifest, states, bn_update)
    model, _ = lower_graph(
        cut.graph,
        cut.shapes,
        cut.keep_outputs,
        _channels_rule(cut.plan.conv_options),
        graph_name="specialised_training",
        producer_name="onnx-neq specialize",
    )
    report = _report(model, cut.layers, states, bn_update, cut.plan, cut.other_macs)
    report.build_seconds = time.perf_counter() - started
    return model, report


@dataclass
class _Cut:
    """The training graph cut to a selection's states, before lowering, with its MACs counted."""

    graph: onnx.GraphProto
    shapes: dict
    keep_outputs: list[str]
    layers: dict
    plan: _Plan
    other_macs: int


def _cut(training_model: onnx.ModelProto, manifest: Manifest, states: dict[str, str], bn_update: str) -> _Cut:
    layers = _checked_layers(manifest, states, bn_update)
    graph = onnx.GraphProto()
    graph.CopyFrom(training_model.graph)
    refuse_unknown(graph)
    shapes = static_shapes(training_model)
    producers = {o: n for n in graph.node for o in n.output if o}
    accumulators = _accumulators(graph)
    bn = _bn_params(graph, manifest, producers)
    keep_outputs = [name for s in manifest.bn_stats for name in (s["batch_mean"], s["batch_inv_std"])]
    plan = _plan(layers, states, bn, bn_update, producers)
    rewrite = _rewrite_accumulators(graph, accumulators, plan, producers)
    _set_inputs(graph, manifest, plan.channel_names, rewrite.dropped_buffers)
    head = _prune(graph, accumulators, rewrite, keep_outputs)
    other_macs = _count_macs(list(graph.node), head, keep_outputs, shapes, layers, plan)
    return _Cut(graph, shapes, keep_outputs, layers, plan, other_macs)


class BackwardCount:
    """Backward MACs per image of any selection, counted as SpecializeReport.backward_macs counts the graph the
    specialised backend builds for it (dX below the shallowest trained layer cut, dW of the selected channels
    only), without lowering the graph or opening a session: one count per tuple of layer states."""

    def __init__(self, training_model: onnx.ModelProto, manifest: Manifest, bn_update: str = "always"):
        self.model, self.manifest, self.bn_update = training_model, manifest, bn_update
        self._counts: dict[tuple[str, ...], tuple[dict[str, LayerSpec], int]] = {}
        self.full = self.macs({layer.name: np.ones(layer.out_channels) for layer in manifest.layers})

    def macs(self, masks: dict[str, np.ndarray]) -> int:
        """Backward MACs per image of a step that trains the channels of `masks` (layer -> 0/1 per channel)."""
        states = layer_states(self.manifest, masks)
        key = tuple(states[layer.name] for layer in self.manifest.layers)
        if key not in self._counts:
            cut = _cut(self.model, self.manifest, states, self.bn_update)
            self._counts[key] = (cut.plan.specs, cut.other_macs)
        specs, other = self._counts[key]
        report = SpecializeReport(states, self.bn_update, specs, [], [], 0, other)
        return report.backward_macs({name: int(np.count_nonzero(masks[name])) for name, state in states.items() if state == "some"})

    def saved(self, masks: dict[str, np.ndarray]) -> float:
        """1 - macs(masks) / the MACs of full backpropagation."""
        return 1.0 - self.macs(masks) / self.full if self.full else 0.0


@dataclass
class _Plan:
    """What specialize does with each parameter's gradient and each layer."""

    actions: dict[str, object] = field(default_factory=dict)  # param -> "full", "drop", or ("gather", channels input)
    specs: dict[str, LayerSpec] = field(default_factory=dict)
    conv_options: dict[str, str] = field(default_factory=dict)  # ConvGrad node name -> channels input
    channel_names: list[str] = field(default_factory=list)


@dataclass
class _Rewrite:
    """What rewriting the accumulators removed and added."""

    dropped_buffers: set[str] = field(default_factory=set)
    dropped_outputs: set[str] = field(default_factory=set)
    removed_nodes: set[int] = field(default_factory=set)
    extra_nodes: list[onnx.NodeProto] = field(default_factory=list)


def _checked_layers(manifest: Manifest, states: dict[str, str], bn_update: str) -> dict:
    """The manifest's layers by name; NeqError unless `states` gives each of them exactly one valid state."""
    if bn_update not in BN_UPDATES:
        raise NeqError(f"bn_update must be one of {', '.join(BN_UPDATES)}, not {bn_update!r}")
    layers = {layer.name: layer for layer in manifest.layers}
    unknown = sorted(set(states) - set(layers))
    if unknown:
        raise NeqError(f"states name layers {unknown[:3]} that the manifest does not have")
    missing = [name for name in layers if name not in states]
    if missing:
        raise NeqError(f"no state for layers {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    bad = {name: s for name, s in states.items() if s not in STATES}
    if bad:
        raise NeqError(f"layer states must be one of {', '.join(STATES)}: {bad}")
    return layers


def _plan(layers: dict, states: dict[str, str], bn: dict[str, tuple[str, str]], bn_update: str, producers) -> _Plan:
    """Each layer's spec and channels input, and what each parameter's gradient becomes."""
    plan = _Plan()
    for name, layer in layers.items():
        state = states[name]
        spec = plan.specs[name] = LayerSpec(state=state, out_channels=layer.out_channels, bn_params=list(bn.get(name, ())))
        params = [p for p in (layer.weight, layer.bias) if p]
        if state == "some":
            spec.channels_input = channels_input_name(layer)
            plan.channel_names.append(spec.channels_input)
            grad_node = producers.get(f"{layer.weight}_grad")
            if grad_node is None or grad_node.op_type != "ConvGrad":
                raise NeqError(f"layer {name}: no ConvGrad computes '{layer.weight}_grad' in the training graph")
            plan.conv_options[grad_node.name] = spec.channels_input
        for p in params:
            plan.actions[p] = "drop" if state == "none" else "full"  # "some": the ConvGrad itself computes [k, ...]
        for p in bn.get(name, ()):
            if bn_update == "always" or state == "all":
                plan.actions[p] = "full"
            elif state == "none":
                plan.actions[p] = "drop"
            else:
                plan.actions[p] = ("gather", spec.channels_input)
    return plan


def _rewrite_accumulators(graph: onnx.GraphProto, accumulators, plan: _Plan, producers) -> _Rewrite:
    """Drop, unmask, or gather each accumulator's gradient (the nodes change in place; the Gathers are returned)."""
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in set(node.input):
            consumers[name].append(node)
    rewrite = _Rewrite()
    for param, (index, node) in accumulators.items():
        action = plan.actions.get(param, "full")
        if action == "drop":
            rewrite.removed_nodes.add(index)
            rewrite.dropped_buffers.add(node.input[0])
            rewrite.dropped_outputs.add(node.output[0])
            continue
        grad = node.input[1]
        mask_mul = producers.get(grad)
        if grad == f"{param}_grad.masked" and mask_mul is not None and mask_mul.op_type == "Mul":
            grad = mask_mul.input[0]  # the unmasked gradient
            node.input[1] = grad
        if isinstance(action, tuple):  # Gather(full gradient) becomes `<param>_grad`
            target = f"{param}_grad"
            if grad == target:
                grad = f"{param}_grad.full"
                _rename_value(consumers, producers, target, grad)
            rewrite.extra_nodes.append(helper.make_node("Gather", [grad, action[1]], [target], name=f"{target}/gather", axis=0))
            node.input[1] = target
    return rewrite


def _set_inputs(graph: onnx.GraphProto, manifest: Manifest, channel_names: list[str], dropped_buffers: set[str]) -> None:
    """Inputs without the masks and dropped buffers; the `<layer>.neq_channels` inputs after the data inputs."""
    new_inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [_count_dim(name)]) for name in channel_names]
    masks = {layer.mask_input for layer in manifest.layers}
    inputs = [i for i in graph.input if i.name not in masks and i.name not in dropped_buffers]
    position = max((n for n, i in enumerate(inputs) if i.name in (manifest.input.name, manifest.label_input)), default=-1) + 1
    inputs[position:position] = new_inputs
    del graph.input[:]
    graph.input.extend(inputs)


def _prune(graph: onnx.GraphProto, accumulators, rewrite: _Rewrite, keep_outputs: list[str]) -> list[onnx.ValueInfoProto]:
    """The rewritten nodes (dead ones removed) and outputs: loss, logits, the gradients, then the BN statistics.
    Returns the outputs before the gradients (loss, logits)."""
    nodes = [n for i, n in enumerate(graph.node) if i not in rewrite.removed_nodes]
    # the Gathers go right before the first accumulator (after every gradient they read)
    first_acc = next(i for i, n in enumerate(nodes) if n.op_type == ACCUMULATOR)
    nodes[first_acc:first_acc] = rewrite.extra_nodes
    outputs = [o for o in graph.output if o.name not in rewrite.dropped_outputs]
    acc_outputs = {n.output[0] for _, n in accumulators.values()}
    head = list(itertools.takewhile(lambda o: o.name not in acc_outputs, outputs))
    grads = [o for o in outputs if o.name in acc_outputs]
    stats = {o.name: o for o in outputs}
    kept = head + grads + [stats[n] for n in keep_outputs if n in stats]
    del graph.output[:]
    graph.output.extend(kept)
    nodes = live_nodes(nodes, [o.name for o in kept])
    _drop_unused_outputs(nodes, {o.name for o in kept})
    del graph.node[:]
    graph.node.extend(nodes)
    return head


def _count_macs(nodes: list[onnx.NodeProto], head, keep_outputs: list[str], shapes, layers: dict, plan: _Plan) -> int:
    """Fill the layers' dX/dW MACs (plan.specs) from their ConvGrads; returns the other backward MACs per image."""
    forward = {id(n) for n in live_nodes(nodes, [o.name for o in head] + keep_outputs)}
    other_macs = _other_backward_macs([n for n in nodes if id(n) not in forward], shapes)
    conv_of = {f"{layer.weight}_grad": name for name, layer in layers.items()}
    for node in nodes:
        if node.op_type == "ConvGrad":
            _conv_macs(node, shapes, plan.specs, conv_of, plan.conv_options)
    return other_macs


def _channels_rule(conv_options: dict[str, str]) -> Callable[[onnx.NodeProto], Rule | None]:
    """lower_graph's rule override: a ConvGrad of a "some" layer computes dW / dB of its selected channels."""

    def rule_for(node: onnx.NodeProto) -> Rule | None:
        if node.op_type == "ConvGrad" and node.name in conv_options:
            return functools.partial(lower_conv_grad, channels=conv_options[node.name])
        return None

    return rule_for


def _report(model: onnx.ModelProto, layers: dict, states: dict[str, str], bn_update: str, plan: _Plan, other_macs: int) -> SpecializeReport:
    """The report of the lowered model; gives the gradient outputs of "some" layers their symbolic [k, ...] shape."""
    grad_names = {o.name for o in model.graph.output if o.name.endswith("_grad")}
    report_layers = {}
    for name, layer in layers.items():
        spec = plan.specs[name]
        spec.gradient_outputs = [f"{p}_grad" for p in (layer.weight, layer.bias, *spec.bn_params) if p and f"{p}_grad" in grad_names]
        report_layers[name] = spec
    _set_selected_shapes(model, plan.actions, layers, plan.specs)
    return SpecializeReport(
        states=dict(states),
        bn_update=bn_update,
        layers=report_layers,
        gradient_outputs=[(o.name, _dims(o)) for o in model.graph.output if o.name in grad_names],
        channel_inputs=plan.channel_names,
        nodes=len(model.graph.node),
        other_backward_macs=other_macs,
    )


# -- graph analysis ------------------------------------------------------------------------------


def _accumulators(graph: onnx.GraphProto) -> dict[str, tuple[int, onnx.NodeProto]]:
    """param -> (index, its InPlaceAccumulatorV2 node)."""
    out = {}
    for i, node in enumerate(graph.node):
        if is_accumulator(node):
            out[accumulated_param(node)] = (i, node)
    return out


def _bn_params(graph: onnx.GraphProto, manifest, producers) -> dict[str, tuple[str, str]]:
    """layer -> (BN scale, BN bias) of the BatchNorm that consumes the layer's conv output, when both are
    always-trained parameters: a training-mode BatchNormInternal (inputs 1, 2), or BatchNormAffinePass's
    Sub(conv, mean4d) -> Mul(., Reshape(Div(scale, std))) -> Add(., Reshape(bias)); else the manifest's
    `bn` of the layer (in a graph from the portable model, BatchNormInternal is lowered)."""
    trained = set(manifest.always_trained)
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}

    def other_input(node, value):
        rest = [i for i in node.input if i != value]
        return rest[0] if len(rest) == 1 else None

    def param_behind(value, first_op):
        """The initializer X of Reshape(first_op(X, ...)) / Reshape(X) chains."""
        node = producers.get(value)
        if node is not None and node.op_type == "Reshape":
            value = node.input[0]
            node = producers.get(value)
        if first_op and node is not None and node.op_type == first_op:
            value = node.input[0]
        return value

    out = {}
    for layer in manifest.layers:
        conv = convs.get(layer.node)
        if conv is None:
            continue
        y = conv.output[0]
        found = None
        for c in consumers[y]:
            if c.op_type == "BatchNormInternal" and c.input[0] == y:
                found = (c.input[1], c.input[2])
            elif c.op_type == "Sub" and c.input[0] == y and not found:
                muls = [m for m in consumers[c.output[0]] if m.op_type == "Mul"]
                for m in muls:
                    scale = param_behind(other_input(m, c.output[0]), "Div")
                    adds = [a for a in consumers[m.output[0]] if a.op_type == "Add"]
                    for a in adds:
                        bias = param_behind(other_input(a, m.output[0]), None)
                        if scale in trained and bias in trained:
                            found = (scale, bias)
        if found and found[0] in trained and found[1] in trained:
            out[layer.name] = found
        elif len(layer.bn) == 2 and set(layer.bn) <= trained:  # a lowered training-mode BatchNorm: the manifest's
            out[layer.name] = (layer.bn[0], layer.bn[1])
    return out


def _rename_value(consumers, producers, old: str, new: str) -> None:
    """Rename value `old` (a node output) to `new` in its producer and consumers."""
    producer = producers.pop(old)
    producer.output[list(producer.output).index(old)] = new
    producers[new] = producer
    for node in consumers.get(old, ()):
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _drop_unused_outputs(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> None:
    """Blank the unused outputs of ConvGrad and BatchNormalizationGrad: their rules then compute only the rest
    (the shallowest needed ConvGrad computes no dX)."""
    used = set(graph_outputs)
    for node in nodes:
        used.update(node.input)
    for node in nodes:
        if node.domain == MS and node.op_type in ("ConvGrad", "BatchNormalizationGrad"):
            for i, name in enumerate(node.output):
                if name and name not in used:
                    node.output[i] = ""


# -- MACs --------------------------------------------------------------------------------------


def _static(dims) -> list[int]:
    """dims with symbolic/unknown sizes as 1 (the batch: MACs per image)."""
    return [d if isinstance(d, int) and d > 0 else 1 for d in dims]


def _conv_macs(node, shapes, specs, conv_of, conv_options) -> None:
    layer = conv_of.get(node.output[1] if len(node.output) > 1 else "") or conv_of.get(f"{node.input[2]}_grad")
    if layer is None:
        return
    spec = specs[layer]
    dy, w = shapes.get(node.input[0]), shapes.get(node.input[2])
    if not dy or not w or dy[1] is None or w[1] is None:
        return
    w_dims = _static(w[1])
    per_out_channel = math.prod(_static(dy[1][2:])) * math.prod(w_dims[1:])  # per image
    if node.output[0]:
        spec.dx_macs = per_out_channel * w_dims[0]
    if len(node.output) > 1 and node.output[1]:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.name in conv_options and not (group > 1 and w_dims[1] > 1):
            spec.dw_macs_per_channel = per_out_channel
        else:
            spec.dw_macs = per_out_channel * w_dims[0]


def _other_backward_macs(nodes, shapes) -> int:
    total = 0
    for node in nodes:
        if node.op_type not in ("Gemm", "MatMul"):
            continue
        a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or not y or a[1] is None or y[1] is None:
            continue
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        inner = a[1][0] if node.op_type == "Gemm" and trans_a else a[1][-1]
        total += math.prod(_static(y[1])) * _static([inner])[0]
    return total


# -- lowering ----------------------------------------------------------------------------------


def _set_selected_shapes(model: onnx.ModelProto, plan, layers, specs) -> None:
    """Gradient outputs of "some" layers (and their gathered BN parameters) are [k, ...] with k symbolic."""
    k_of: dict[str, str] = {}
    for name, layer in layers.items():
        spec = specs[name]
        if spec.state != "some":
            continue
        k = _count_dim(spec.channels_input)
        for p in (layer.weight, layer.bias):
            if p:
                k_of[f"{p}_grad"] = k
    for p, action in plan.items():
        if isinstance(action, tuple):
            k_of[f"{p}_grad"] = _count_dim(action[1])
    for out in model.graph.output:
        if out.name in k_of:
            dim = out.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = k_of[out.name]


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


_FULL_MACS: dict[tuple, int] = {}


def full_backward_macs(artifacts: str | Path, manifest: Manifest, graph: str = "training_model") -> int:
    """Backward MACs per image of the unspecialised graph (every gradient), once per graph file. `graph`:
    the manifest's file to read it from, "training_model" (ORT's) or "portable_training_model" (the
    portable backends: the same MACs, from the files a board holds)."""
    path = Path(artifacts) / manifest.files.get(graph, "")
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), graph, stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    if key not in _FULL_MACS:
        _FULL_MACS[key] = BackwardCount(load_training_graph(artifacts, manifest, graph), manifest).full
    return _FULL_MACS[key]


def load_training_graph(artifacts: str | Path, manifest: Manifest, graph: str = "portable_training_model") -> onnx.ModelProto:
    """The graph `specialize` takes, read from the manifest's file `graph`: ORT's training_model.onnx as it
    is, or portable_training_model.onnx with its convolution gradients raised back (training_graph_from_portable)."""
    path = artifact_model(artifacts, manifest, graph)
    model = onnx.load(str(path))
    return training_graph_from_portable(model, manifest) if graph == "portable_training_model" else model


# -- the training graph from the portable model --------------------------------------------------


def training_graph_from_portable(portable: onnx.ModelProto, manifest: Manifest) -> onnx.ModelProto:
    """The graph `specialize` takes, rebuilt from portable_training_model.onnx alone (a board holds no
    training_model.onnx): each conv's lowered ConvGrad nodes become one com.microsoft ConvGrad(dY, X, W)
    again, with the forward Conv's attributes and outputs (dX, `<weight>_grad`, `<bias>_grad`), and each
    `<param>_grad` output an InPlaceAccumulatorV2 on a `<param>_grad.accumulation.buffer` input, as in
    ORT's graph. Every other node is standard ONNX already, which specialize passes through."""
    inferred = onnx.shape_inference.infer_shapes(portable, strict_mode=False).graph.value_info
    graph = onnx.GraphProto()
    graph.CopyFrom(portable.graph)
    sources = _accumulate_gradient_outputs(graph)
    index = _NodeIndex(list(graph.node), {t.name for t in graph.initializer})
    raised = [_raise_conv_grad(graph, index, sources, layer) for layer in manifest.layers]
    renamed = {old: new for _, _, names in raised for old, new in names.items()}
    replaced = {members[0]: node for members, node, _ in raised}
    dropped = {i for members, _, _ in raised for i in members}
    nodes = [replaced.get(i, n) for i, n in enumerate(index.nodes) if i in replaced or i not in dropped]
    for node in nodes:
        node.input[:] = [renamed.get(value, value) for value in node.input]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.value_info.extend(_renamed_value_info(inferred, renamed))
    opsets = [o for o in portable.opset_import if o.domain != MS] + [helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=portable.ir_version)
    model.producer_name = "onnx-neq specialize (from the portable model)"
    return model


def _renamed_value_info(infos, renamed: dict[str, str]) -> list[onnx.ValueInfoProto]:
    out = []
    for vi in infos:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(vi)
        copy.name = renamed.get(vi.name, vi.name)
        out.append(copy)
    return out


def _accumulate_gradient_outputs(graph: onnx.GraphProto) -> dict[str, str]:
    """Each `<param>_grad` output (param: a graph input) -> InPlaceAccumulatorV2(buffer, gradient) ->
    `<param>_grad.accumulation.out`; the Identity that named the output goes. Returns param -> the
    gradient value behind its mask's Mul (`<param>_grad.masked`), where it has one."""
    params = {i.name for i in graph.input}
    producers = {o: n for n in graph.node for o in n.output if o}
    outputs, sources = [], {}
    for out in graph.output:
        param = out.name[: -len("_grad")] if out.name.endswith("_grad") else None
        if param not in params:
            outputs.append(out)
            continue
        identity = producers.get(out.name)
        source = out.name
        if identity is not None and identity.op_type == "Identity" and identity.name == f"{out.name}/output":
            source = identity.input[0]
            graph.node.remove(identity)
        mask = producers.get(source)
        masked = mask is not None and mask.op_type == "Mul" and source == f"{param}_grad.masked"
        sources[param] = mask.input[0] if masked else source
        buffer = f"{param}{BUFFER_SUFFIX}"
        graph.input.append(onnx.ValueInfoProto(name=buffer, type=out.type))
        acc = f"{out.name}.accumulation.out"
        graph.node.append(helper.make_node(ACCUMULATOR, [buffer, source], [acc], name=f"{acc}/accumulate", domain=MS))
        outputs.append(onnx.ValueInfoProto(name=acc, type=out.type))
    del graph.output[:]
    graph.output.extend(outputs)
    return sources


@dataclass
class _NodeIndex:
    """The nodes of a graph, each value's producer and consumers, and the nodes by name prefix (a lowered
    node is named `<the node it lowers>/<op>`)."""

    nodes: list[onnx.NodeProto]
    constants: set[str]  # initializer names

    def __post_init__(self) -> None:
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.convs = {n.name: n for n in self.nodes if n.op_type == "Conv"}
        self.consumers: dict[str, set[int]] = collections.defaultdict(set)
        self.by_prefix: dict[str, list[int]] = collections.defaultdict(list)
        for i, node in enumerate(self.nodes):
            for value in node.input:
                self.consumers[value].add(i)
            if "/" in node.name:
                self.by_prefix[node.name.rsplit("/", 1)[0]].append(i)


def _raise_conv_grad(graph: onnx.GraphProto, index: _NodeIndex, sources: dict[str, str], layer):
    """The ConvGrad that `layer`'s lowered nodes (named `<ConvGrad>/...`, one contiguous run) stand for:
    (their indices, the ConvGrad node, {gradient value: `<param>_grad`})."""
    fix = "run `onnx-neq prepare` again"
    dw = sources.get(layer.weight)
    if dw not in index.producer or "/" not in index.nodes[index.producer[dw]].name:
        raise NeqError(f"layer {layer.name!r}: the portable training model computes no weight gradient {layer.weight!r}; {fix}")
    prefix = index.nodes[index.producer[dw]].name.rsplit("/", 1)[0]
    members = index.by_prefix[prefix]
    if members != list(range(members[0], members[-1] + 1)):
        raise NeqError(f"layer {layer.name!r}: the lowered gradient nodes '{prefix}/...' are not one run of nodes; {fix}")
    conv = index.convs.get(layer.node)
    if conv is None or conv.input[1] != layer.weight:
        raise NeqError(f"layer {layer.name!r}: the portable training model has no forward Conv {layer.node!r}; {fix}")
    nodes = [index.nodes[i] for i in members]
    db = sources.get(layer.bias) if layer.bias else None
    dx = next((n.output[0] for n in nodes if n.op_type == "ConvTranspose"), "")
    names = {dw: f"{layer.weight}_grad", **({db: f"{layer.bias}_grad"} if db else {})}
    inside = {o for n in nodes for o in n.output if o}
    outputs = {o.name for o in graph.output}
    member_set = set(members)
    leaving = {v for v in inside if v in outputs or index.consumers[v] - member_set}
    if not set(names) <= inside or not leaving <= {dx, *names}:
        raise NeqError(f"layer {layer.name!r}: its lowered ConvGrad '{prefix}/...' computes other values than dX, dW, dB; {fix}")
    dy = _lowered_dy(nodes, inside, index.constants, conv, layer, fix)
    node = helper.make_node("ConvGrad", [dy, conv.input[0], conv.input[1]], [dx, *names.values()], name=prefix, domain=MS)
    node.attribute.extend(conv.attribute)
    return members, node, names


def _lowered_dy(nodes: list[onnx.NodeProto], inside: set[str], constants: set[str], conv, layer, fix: str) -> str:
    """dY of a lowered ConvGrad: the one value its nodes read from outside other than X, W and constants."""
    external = {i for n in nodes for i in n.input if i and i not in inside and i not in constants and i not in conv.input[:2]}
    if len(external) != 1:
        raise NeqError(f"layer {layer.name!r}: cannot tell the output gradient of its lowered ConvGrad ({sorted(external)[:3]}); {fix}")
    return external.pop()
