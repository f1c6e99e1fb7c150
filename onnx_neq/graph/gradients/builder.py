"""build_training_model: a forward classifier -> the standard-ONNX training graph (loss, logits, gradients).

The contract (what backends/portable.py runs and graph/specialize.py rewrites):
  inputs   the image input, `labels` (int64 [N]), one float mask [C_out] per conv layer, then every
           parameter, trained and frozen, as a graph input (bound by name); other constants stay initializers
  outputs  loss, logits, `<param>_grad` per trained parameter, then per training-mode BatchNorm its batch
           mean and inverse std (the loop updates the running statistics from them on the host)
  masks    `<w>_grad = dW * Reshape(mask, [-1, 1, 1, 1])`, `<b>_grad = dB * mask`

How: the loss SoftmaxCrossEntropyLoss(logits, labels, mean) is appended; training-mode BatchNorm is
computed as the lowering computes ORT's BatchNormInternal (bit-identical sums) keeping its batch
statistics; MaxPool gets its Indices output. The nodes on a path from a trained parameter to the loss
(stop edges per rule) are then visited in reverse order, each by its op's rule (gradients/rules.py);
a value's gradient contributions are summed once every consumer has been visited. Standard ONNX,
opset 17, IR 8: it runs on stock onnxruntime and needs no onnxruntime-training.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_neq.errors import NeqError
from onnx_neq.graph.conv_layers import ConvLayer
from onnx_neq.graph.gradients.context import GradContext
from onnx_neq.graph.gradients.rules import NO_GRADIENT, RULES
from onnx_neq.graph.lowering import IR_VERSION, OPSET, NameSource, live_nodes, static_shapes
from onnx_neq.graph.lowering.builder import Builder
from onnx_neq.graph.lowering.norm_grads import lower_batch_norm_internal
from onnx_neq.graph.passes.activation_rewrites import REWRITTEN_OPS

FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclass
class GradientReport:
    """What build_training_model did."""

    loss_output: str = ""
    gradient_outputs: list[str] = field(default_factory=list)
    mask_inputs: list[str] = field(default_factory=list)
    bn_stats: list[dict] = field(default_factory=list)
    differentiated: dict[str, int] = field(default_factory=dict)  # forward op type -> nodes given a gradient rule
    unreached: list[str] = field(default_factory=list)  # trained parameters the loss does not depend on (gradient 0)
    nodes: int = 0


def build_training_model(
    forward: onnx.ModelProto,
    trainable: list[str],
    frozen: list[str],
    layers: list[ConvLayer],
    logits: str,
    label_input: str,
    bn_positions: dict[str, int] | None = None,
) -> tuple[onnx.ModelProto, GradientReport]:
    """The training graph of `forward` (after prepare's passes), and a report. `bn_positions`: running_mean
    -> H*W of each training-mode BatchNorm whose batch statistics become outputs. `trainable` and `frozen`
    become graph inputs (frozen ones get no gradient); other initializers stay constants."""
    build = _Build(forward, trainable, frozen, layers, logits, label_input, bn_positions or {})
    return build.model(), build.report


def build_eval_model(forward: onnx.ModelProto, parameters: list[str], logits: str, label_input: str) -> onnx.ModelProto:
    """The forward graph with the loss: outputs loss and logits; `parameters` become graph inputs."""
    graph = _graph_copy(forward)
    names = NameSource(graph)
    loss, _ = _append_loss(graph, names, logits, label_input)
    outputs = [helper.make_tensor_value_info(loss, TensorProto.FLOAT, []), _output_info(forward, logits)]
    return _assemble(graph, forward, parameters, list(graph.node), outputs, [], label_input, [])


class _Build:
    def __init__(self, forward, trainable, frozen, layers, logits, label_input, bn_positions):
        self.forward, self.trainable, self.frozen, self.layers = forward, list(trainable), list(frozen), layers
        self.logits, self.label_input, self.bn_positions = logits, label_input, bn_positions
        self.report = GradientReport()
        self.graph = _graph_copy(forward)
        self.names = NameSource(self.graph)
        clash = [p for p in self.trainable if f"{p}_grad" in self.names.used]
        if clash:
            raise NeqError(f"the model already has values named {[f'{p}_grad' for p in clash[:3]]}; rename them in the source model")
        self.names.used.update(f"{p}_grad" for p in self.trainable)  # the gradient outputs
        self.loss, self.log_prob = _append_loss(self.graph, self.names, logits, label_input)
        self.report.loss_output = self.loss
        self.shapes = static_shapes(_with_loss_types(forward, self.graph, label_input))
        self.constants = _int_constants(self.graph)

    # -- the graph ---------------------------------------------------------------------------
    def model(self) -> onnx.ModelProto:
        need = self._needing_gradient()
        _refuse_missing_rules(self.graph, need)
        forward_nodes, saved, extra_inits = self._forward_nodes(need)
        self.producers = {o: n for n in forward_nodes for o in n.output if o}
        grads, nodes, inits = _Backward(self).run(need, saved)
        outputs, tail, tail_inits = self._outputs(grads)
        nodes += tail
        inits += tail_inits
        inputs_extra = [helper.make_tensor_value_info(layer.mask_input, TensorProto.FLOAT, [layer.out_channels]) for layer in self.layers]
        self.report.mask_inputs = [layer.mask_input for layer in self.layers]
        model = _assemble(
            self.graph,
            self.forward,
            self.trainable + self.frozen,
            forward_nodes + nodes,
            outputs,
            extra_inits + inits,
            self.label_input,
            inputs_extra,
        )
        self.report.nodes = len(model.graph.node)
        return model

    def _needing_gradient(self) -> set[str]:
        """Values on a path from a trained parameter to the loss (through edges that carry gradients)."""
        requires = set(self.trainable)
        for node in self.graph.node:
            if node.op_type in NO_GRADIENT:
                continue
            if any(node.input[i] in requires for i in _differentiable(node)) or _outer_values(node) & requires:
                requires.update(o for o in _float_outputs(node, self.shapes))
        useful = {self.loss}
        for node in reversed(self.graph.node):
            if node.op_type not in NO_GRADIENT and any(o in useful for o in node.output if o):
                useful.update(node.input[i] for i in _differentiable(node))
                useful.update(_outer_values(node))
        return requires & useful

    def _forward_nodes(self, need: set[str]):
        """The forward nodes as the training graph computes them; (nodes, {BN node: (mean, inv_std)}, initializers)."""
        nodes, saved, inits = [], {}, []
        for node in self.graph.node:
            if node.op_type == "BatchNormalization" and _training_mode(node):
                lowered, stats = self._training_batch_norm(node)
                nodes += lowered.nodes
                inits += lowered.initializers
                saved[node.name] = stats
                continue
            if node.op_type == "MaxPool" and node.input[0] in need and len(node.output) < 2:
                node.output.append(self.names(f"{node.output[0]}.indices"))
            nodes.append(node)
        return nodes, saved, inits

    def _training_batch_norm(self, node: onnx.NodeProto) -> tuple[Builder, tuple[str, str]]:
        """BatchNormInternal's lowering: Y and the batch mean and inverse std (outputs for the statistics)."""
        mean, inv_std = self.names(f"{node.name}.batch_mean"), self.names(f"{node.name}.batch_inv_std")
        internal = helper.make_node("BatchNormInternal", list(node.input[:5]), [node.output[0], "", "", mean, inv_std], name=node.name)
        internal.attribute.extend(a for a in node.attribute if a.name in ("epsilon", "momentum"))
        b = Builder(internal, self.shapes, {}, self.names)
        lower_batch_norm_internal(b)
        if node.input[3] in self.bn_positions:
            self.report.bn_stats.append(_bn_stat(node, mean, inv_std, self.bn_positions[node.input[3]]))
        return b, (mean, inv_std)

    def _outputs(self, grads: dict[str, str]):
        """loss, logits, `<param>_grad` (masked for conv layers), then the BatchNorm statistics."""
        masked = _masked_params(self.layers)
        outputs = [helper.make_tensor_value_info(self.loss, TensorProto.FLOAT, []), _output_info(self.forward, self.logits)]
        nodes, inits = [], []
        types = {t.name: t for t in self.forward.graph.initializer}
        for p in self.trainable:
            grad = grads.get(p)
            if grad is None:
                self.report.unreached.append(p)
                grad = self.names(f"{p}_grad.zero")
                inits.append(numpy_helper.from_array(np.zeros(types[p].dims, helper.tensor_dtype_to_np_dtype(types[p].data_type)), grad))
            if p in masked:
                grad = _masked(p, grad, *masked[p], nodes, inits)
            out = f"{p}_grad"
            nodes.append(helper.make_node("Identity", [grad], [out], name=f"{out}/output"))
            outputs.append(helper.make_tensor_value_info(out, types[p].data_type, list(types[p].dims)))
            self.report.gradient_outputs.append(out)
        for s in self.report.bn_stats:
            channels = [self.shapes[s["running_mean"]][1][0]]
            outputs += [helper.make_tensor_value_info(s[k], TensorProto.FLOAT, channels) for k in ("batch_mean", "batch_inv_std")]
        return outputs, nodes, inits


class _Backward:
    """The backward pass of a _Build: each forward node's gradient rule, in reverse order, and the sums of a
    value's gradient contributions."""

    def __init__(self, build: _Build):
        self.build = build
        self.names, self.shapes = build.names, build.shapes

    def run(self, need: set[str], saved: dict[str, tuple[str, str]]) -> tuple[dict[str, str], list[onnx.NodeProto], list[onnx.TensorProto]]:
        """Visit the forward nodes in reverse; returns ({value: gradient}, nodes, initializers)."""
        one = self.names(f"{self.build.loss}_grad")
        inits = [numpy_helper.from_array(np.array(1.0, np.float32), one)]
        contributions: dict[str, list[str]] = collections.defaultdict(list)
        contributions[self.build.loss].append(one)
        nodes: list[onnx.NodeProto] = []
        counts: collections.Counter[str] = collections.Counter()
        for node in reversed(self.build.graph.node):
            dys = [self.accumulated(o, contributions, nodes) if o in contributions else None for o in node.output]
            differentiable = _differentiable(node)
            needs = [i in differentiable and node.input[i] in need for i in range(len(node.input))]
            if not any(dys) or not any(needs):
                continue
            g = GradContext(node, dys, needs, self.shapes, self.build.producers, self.names, self.build.constants)
            g.saved = saved
            RULES[node.op_type].fn(g)
            self._name_gradients(g, contributions)
            nodes += g.nodes
            inits += g.initializers
            counts[node.op_type] += 1
            for i, value in g.grads.items():
                g.note_shape(value, node.input[i])
                contributions[node.input[i]].append(value)
        self.build.report.differentiated = dict(sorted(counts.items()))
        grads = {p: self.accumulated(p, contributions, nodes) for p in self.build.trainable if p in contributions}
        return grads, nodes, inits

    def _name_gradients(self, g: GradContext, contributions) -> None:
        """Name a new gradient of value v `<v>_grad` (as ORT does) where that is free: v's first contribution,
        computed by this rule's own nodes and given to no other input."""
        produced = {o: n for n in g.nodes for o in n.output}
        values = list(g.grads.values())
        for i, value in g.grads.items():
            target = f"{g.forward.input[i]}_grad"
            if value not in produced or values.count(value) > 1 or contributions.get(g.forward.input[i]) or target in self.names.used:
                continue
            self.names.used.add(target)
            for n in g.nodes:
                n.output[:] = [target if o == value else o for o in n.output]
                n.input[:] = [target if v == value else v for v in n.input]
            g.grads[i] = target

    def accumulated(self, value: str, contributions: dict[str, list[str]], nodes: list) -> str:
        """The one gradient of `value`: its contribution, or their Sum (emitted once, when first asked)."""
        parts = contributions[value]
        if len(parts) > 1:
            total = self.names(f"{value}_grad.sum")
            nodes.append(helper.make_node("Sum", parts, [total], name=self.names(f"AccumulateGrad_{value}")))
            if value in self.shapes:
                self.shapes[total] = self.shapes[value]
            contributions[value] = [total]
        return contributions[value][0]


def _bn_stat(node: onnx.NodeProto, mean: str, inv_std: str, positions: int) -> dict:
    """The manifest's bn_stats entry of training-mode BatchNorm `node`."""
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    return {
        "running_mean": node.input[3],
        "running_var": node.input[4],
        "batch_mean": mean,
        "batch_inv_std": inv_std,
        "epsilon": float(eps),
        "positions": positions,
    }


def _masked_params(layers: list[ConvLayer]) -> dict[str, tuple[str, int]]:
    """Each conv weight and bias -> (its layer's mask input, the rank its gradient has)."""
    masked = {}
    for layer in layers:
        masked[layer.weight] = (layer.mask_input, len(layer.kernel) + 2)
        if layer.bias:
            masked[layer.bias] = (layer.mask_input, 1)
    return masked


def _masked(param: str, grad: str, mask: str, rank: int, nodes: list, inits: list) -> str:
    """grad * mask (reshaped to [-1, 1, ...] for a weight), named as GradientMaskPass names it."""
    scale = mask
    if rank > 1:
        shape, scale = f"{mask}.shape{rank}", f"{mask}.{rank}d"
        if not any(t.name == shape for t in inits):
            inits.append(numpy_helper.from_array(np.array([-1] + [1] * (rank - 1), np.int64), shape))
            nodes.append(helper.make_node("Reshape", [mask, shape], [scale], name=f"{mask}.reshape{rank}"))
    out = f"{param}_grad.masked"
    nodes.append(helper.make_node("Mul", [grad, scale], [out], name=out))
    return out


def _refuse_missing_rules(graph: onnx.GraphProto, need: set[str]) -> None:
    """NeqError naming the ops (and their nodes) on a gradient path that have no gradient rule."""
    missing: dict[str, list[str]] = collections.defaultdict(list)
    for node in graph.node:
        if any(o in need for o in node.output) and (node.domain not in ("", "ai.onnx") or node.op_type not in RULES):
            missing[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"].append(node.name)
    if missing:
        parts = []
        for op, nodes in missing.items():
            shown = ", ".join(repr(n) for n in nodes[:8]) + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else "")
            parts.append(f"{op} (nodes {shown})")
        raise NeqError(
            f"ops with no gradient rule: {'; '.join(parts)}; replace them with differentiable ops in the source model "
            f"(prepare rewrites {', '.join(REWRITTEN_OPS)} itself; the ops with rules are listed in ARCHITECTURE.md)"
        )


# -- helpers -------------------------------------------------------------------------------------


def _graph_copy(model: onnx.ModelProto) -> onnx.GraphProto:
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.value_info[:]
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return graph


def _append_loss(graph: onnx.GraphProto, names, logits: str, label_input: str) -> tuple[str, str]:
    loss, log_prob = names("loss"), names("log_prob")
    graph.node.append(
        helper.make_node(
            "SoftmaxCrossEntropyLoss", [logits, label_input], [loss, log_prob], name=names("loss/SoftmaxCrossEntropyLoss"), reduction="mean"
        )
    )
    return loss, log_prob


def _output_info(forward: onnx.ModelProto, logits: str) -> onnx.ValueInfoProto:
    for out in forward.graph.output:
        if out.name == logits:
            return out
    raise NeqError(f"the model has no output {logits!r}")


def _label_info(label_input: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(label_input, TensorProto.INT64, ["batch"])


def _with_loss_types(forward: onnx.ModelProto, graph: onnx.GraphProto, label_input: str) -> onnx.ModelProto:
    """A model of `graph` (the forward graph with the loss) with the labels input typed, for shape inference."""
    g = onnx.GraphProto()
    g.CopyFrom(graph)
    g.input.append(_label_info(label_input))
    return helper.make_model(g, opset_imports=list(forward.opset_import), ir_version=forward.ir_version)


def _int_constants(graph: onnx.GraphProto) -> dict[str, list[int]]:
    out = {}
    for t in graph.initializer:
        if t.data_type in (TensorProto.INT64, TensorProto.INT32) and len(t.dims) <= 1:
            out[t.name] = [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name in ("value", "value_ints", "value_int"):
            a = node.attribute[0]
            if a.name == "value" and a.t.data_type in (TensorProto.INT64, TensorProto.INT32) and len(a.t.dims) <= 1:
                out[node.output[0]] = [int(v) for v in numpy_helper.to_array(a.t).reshape(-1)]
            elif a.name == "value_ints":
                out[node.output[0]] = list(a.ints)
            elif a.name == "value_int":
                out[node.output[0]] = [a.i]
    return out


def _differentiable(node: onnx.NodeProto) -> list[int]:
    rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    indices = rule.inputs if rule is not None and rule.inputs is not None else range(len(node.input))
    return [i for i in indices if i < len(node.input) and node.input[i]]


def _outer_values(node: onnx.NodeProto) -> set[str]:
    """Values of the enclosing graph that a control-flow node's subgraphs read (its implicit inputs)."""
    found: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
            for inner in sub.node:
                found.update(i for i in inner.input if i and i not in defined)
                found.update(_outer_values(inner) - defined)
    return found


def _float_outputs(node: onnx.NodeProto, shapes) -> list[str]:
    """The outputs that can carry a gradient: float ones (MaxPool's Indices and the like excluded)."""
    if node.op_type == "MaxPool":
        return [node.output[0]]
    return [o for o in node.output if o and shapes.get(o, (TensorProto.FLOAT, None))[0] in FLOATS]


def _training_mode(node: onnx.NodeProto) -> bool:
    return any(a.name == "training_mode" and a.i == 1 for a in node.attribute)


def _assemble(graph, forward, params: list[str], nodes, outputs, new_inits, label_input: str, extra_inputs) -> onnx.ModelProto:
    """The model: data inputs, labels, `extra_inputs`, `params` as inputs; other used initializers kept."""
    initializers = {t.name: t for t in itertools.chain(graph.initializer, new_inits)}
    data_inputs = [i for i in forward.graph.input if i.name not in initializers]
    param_inputs = [helper.make_tensor_value_info(p, initializers[p].data_type, list(initializers[p].dims)) for p in params]
    live = live_nodes(list(nodes), [o.name for o in outputs])
    used = {i for n in live for i in n.input} | {o.name for o in outputs}
    param_set = set(params)
    kept = [t for name, t in initializers.items() if name in used and name not in param_set]
    inputs = [*data_inputs, _label_info(label_input), *extra_inputs, *param_inputs]
    out_graph = helper.make_graph(live, graph.name or "training", inputs, outputs, kept)
    model = helper.make_model(out_graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    model.producer_name = "onnx-neq gradients"
    model.metadata_props.extend(forward.metadata_props)
    return model
