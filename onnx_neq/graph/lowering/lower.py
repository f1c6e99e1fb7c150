"""lower_training_model: ORT's training_model.onnx -> a standard-ONNX graph that computes loss, logits and gradients.

Its steps are public for the graph modules that rewrite a training graph first (specialize.py) or build one
(gradients/builder.py): `refuse_unknown`, `static_shapes`, `lower_graph`, `live_nodes` and `NameSource`.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
from onnx import helper

from onnx_neq.errors import NeqError
from onnx_neq.graph.lowering.builder import Builder
from onnx_neq.graph.lowering.rules import RULES, Rule

OPSET = 17
IR_VERSION = 8
ACCUMULATOR = "InPlaceAccumulatorV2"
BUFFER_SUFFIX = "_grad.accumulation.buffer"


@dataclass
class LoweringReport:
    """What lower_training_model did: how many nodes of each op type it rewrote, and the gradient outputs in order."""

    lowered: dict[str, int] = field(default_factory=dict)
    gradient_outputs: list[str] = field(default_factory=list)
    accumulators_removed: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    dropped_outputs: list[str] = field(default_factory=list)  # extra outputs after the gradients (e.g. BN saved stats)


def is_standard(node: onnx.NodeProto) -> bool:
    """A default-domain op that exists in ONNX opset 17."""
    if node.domain not in ("", "ai.onnx"):
        return False
    try:
        onnx.defs.get_schema(node.op_type, OPSET, "")
    except onnx.defs.SchemaError:
        return False
    return True


def lower_training_model(model: onnx.ModelProto, keep_outputs: list[str] | None = None) -> tuple[onnx.ModelProto, LoweringReport]:
    """The portable training model of ORT training graph `model`, and a report.

    Inputs: the original inputs minus accumulation buffers and lazy_reset_grad. Outputs: loss, logits, then
    `<param>_grad` per accumulator (in the accumulation outputs' order), then `keep_outputs`.
    Every node is standard ONNX (opset 17); NeqError names the ops that have no lowering.
    """
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    refuse_unknown(graph)
    return lower_graph(graph, static_shapes(model), keep_outputs or [])


def lower_graph(
    graph: onnx.GraphProto,
    shapes: dict[str, tuple[int, list | None]],
    keep_outputs: list[str],
    rule_for: Callable[[onnx.NodeProto], Rule | None] | None = None,
    graph_name: str = "portable_training",
    producer_name: str = "onnx-neq lowering",
) -> tuple[onnx.ModelProto, LoweringReport]:
    """lower_training_model's steps on `graph` (an ORT training graph that `refuse_unknown` accepts; it is
    changed in place), with `shapes` from `static_shapes` of its model. `rule_for(node)`: a rule that
    replaces the registry's for that node (None: the registry's); `graph_name` names the graph when it has
    no name, `producer_name` the model's producer."""
    report = LoweringReport(nodes_before=len(graph.node))
    names = NameSource(graph)
    grads, dropped_inputs = _take_accumulators(graph, names, report)
    outputs = _outputs(graph, grads, keep_outputs, shapes, report)  # appends Identity nodes for renamed gradients
    report.gradient_outputs = [f"{param}_grad" for out, (_, param, _) in grads.items() if out in {o.name for o in graph.output}]
    new_nodes, new_inits = _lowered_nodes(graph, shapes, names, report, rule_for)
    new_nodes = live_nodes(new_nodes, [o.name for o in outputs])
    inputs = [i for i in graph.input if i.name not in dropped_inputs]
    input_names = {i.name for i in inputs}
    used = {i for n in new_nodes for i in n.input} | {o.name for o in outputs}
    initializers = [t for t in itertools.chain(graph.initializer, new_inits) if t.name in used or t.name in input_names]
    out_graph = helper.make_graph(new_nodes, graph.name or graph_name, inputs, outputs, initializers)
    lowered = helper.make_model(out_graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    lowered.producer_name = producer_name
    _fill_output_types(lowered)
    report.nodes_after = len(new_nodes)
    return lowered, report


def _lowered_nodes(graph: onnx.GraphProto, shapes, names: NameSource, report: LoweringReport, rule_for) -> tuple[list, list]:
    """Every node of `graph` in standard ONNX: standard nodes as they are (default domain), the others by their
    rule; (nodes, new initializers). Counts the lowered op types in `report.lowered`."""
    producers = {o: n for n in graph.node for o in n.output if o}
    new_nodes, new_inits = [], []
    counts: collections.Counter[str] = collections.Counter()
    for node in graph.node:
        if is_standard(node):
            node.domain = ""
            new_nodes.append(node)
            continue
        b = Builder(node, shapes, producers, names)
        rule = rule_for(node) if rule_for is not None else None
        (rule or RULES[(node.domain if node.domain != "ai.onnx" else "", node.op_type)])(b)
        new_nodes.extend(b.nodes)
        new_inits.extend(b.initializers)
        counts[node.op_type] += 1
    report.lowered = dict(sorted(counts.items()))
    return new_nodes, new_inits


def refuse_unknown(graph: onnx.GraphProto) -> None:
    """NeqError naming, on one line, every non-standard op type without a rule and its nodes."""
    missing: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for node in graph.node:
        if node.op_type == ACCUMULATOR and node.domain == "com.microsoft" or is_standard(node):
            continue
        domain = node.domain if node.domain != "ai.onnx" else ""
        if (domain, node.op_type) not in RULES:
            missing[(domain or "ai.onnx", node.op_type)].append(node.name)
    if not missing:
        return
    by_domain: dict[str, list[str]] = collections.defaultdict(list)
    for (domain, op), nodes in missing.items():
        by_domain[domain].append(f"{op} (node{'s' if len(nodes) > 1 else ''} {', '.join(repr(n) for n in nodes)})")
    parts = [f"{domain} ops: {'; '.join(ops)}" for domain, ops in by_domain.items()]
    raise NeqError("no standard-ONNX lowering for " + " | ".join(parts))


class NameSource:
    """Fresh value/node names that clash with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o.name for o in graph.output}
        for n in graph.node:
            self.used.update(n.output)
            self.used.add(n.name)
        self.counter = itertools.count()

    def __call__(self, hint: str) -> str:
        name = hint
        while name in self.used:
            name = f"{hint}_{next(self.counter)}"
        self.used.add(name)
        return name


def is_accumulator(node: onnx.NodeProto) -> bool:
    """ORT's gradient accumulator (InPlaceAccumulatorV2), which training graphs end each gradient with."""
    return node.op_type == ACCUMULATOR and node.domain == "com.microsoft"


def accumulated_param(node: onnx.NodeProto) -> str:
    """The parameter whose gradient an accumulator node sums: its buffer's name without BUFFER_SUFFIX."""
    buffer = node.input[0]
    return buffer[: -len(BUFFER_SUFFIX)] if buffer.endswith(BUFFER_SUFFIX) else buffer


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, list | None]]:
    """name -> (elem_type, dims) from the model's own value_info (ORT writes it) and ONNX shape inference."""
    shapes: dict[str, tuple[int, list | None]] = {}

    def add(vi: onnx.ValueInfoProto) -> None:
        if vi.name in shapes or not vi.type.HasField("tensor_type"):
            return
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        shapes[vi.name] = (tt.elem_type, dims)

    g = model.graph
    for vi in itertools.chain(g.input, g.output, g.value_info):
        add(vi)
    for t in g.initializer:
        shapes.setdefault(t.name, (t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        for vi in inferred.graph.value_info:
            add(vi)
    except Exception:  # noqa: BLE001 - inference is a best effort; rules ask for what they need
        pass
    return shapes


def _take_accumulators(graph: onnx.GraphProto, names: NameSource, report: LoweringReport):
    """Remove InPlaceAccumulatorV2 nodes; returns ({accumulation.out: (grad value, param)}, inputs to drop)."""
    grads: dict[str, tuple[str, str]] = {}
    dropped: set[str] = set()
    kept = []
    for node in graph.node:
        if is_accumulator(node):
            buffer, grad = node.input[0], node.input[1]
            param = accumulated_param(node)
            grads[node.output[0]] = (grad, param, buffer)
            dropped.add(buffer)
            if len(node.input) > 2 and node.input[2]:
                dropped.add(node.input[2])
            report.accumulators_removed += 1
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    # `<param>_grad` becomes an output name: move any other value of that name out of the way
    for grad, param, _ in grads.values():
        target = f"{param}_grad"
        if grad != target and target in names.used:
            _rename(graph, target, names(f"{target}.unmasked"))
    return grads, dropped


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, v in enumerate(seq):
                if v == old:
                    seq[i] = new


def _outputs(graph: onnx.GraphProto, grads, keep: list[str], shapes, report) -> list[onnx.ValueInfoProto]:
    """loss, logits (the outputs before the first accumulator's), `<param>_grad` per accumulator, then `keep`."""
    types = {i.name: i.type for i in graph.input}
    outputs, identities = [], []
    seen_grad = False
    for out in graph.output:
        if out.name not in grads:
            if seen_grad and out.name not in keep:
                report.dropped_outputs.append(out.name)
            elif not seen_grad:
                outputs.append(out)
            continue
        seen_grad = True
        grad, param, buffer = grads[out.name]
        target = f"{param}_grad"
        if grad != target:
            identities.append(helper.make_node("Identity", [grad], [target], name=f"{target}/output"))
        vi = onnx.ValueInfoProto(name=target)
        vi.type.CopyFrom(types[buffer])  # the buffer has the parameter's type and shape
        outputs.append(vi)
    graph.node.extend(identities)
    for name in keep:
        elem, dims = shapes.get(name, (onnx.TensorProto.FLOAT, None))
        outputs.append(helper.make_tensor_value_info(name, elem, dims))
    return outputs


def live_nodes(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes that some output depends on, in their order."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            live.append(node)
            needed.update(i for i in node.input if i)
    return live[::-1]


def _fill_output_types(model: onnx.ModelProto) -> None:
    """Give kept outputs whose shape the training graph did not record the one ONNX shape inference finds."""
    missing = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
    if not missing:
        return
    graph = onnx.shape_inference.infer_shapes(model).graph
    inferred = {v.name: v for v in itertools.chain(graph.value_info, graph.output) if v.type.tensor_type.HasField("shape")}
    for out in missing:
        if out.name not in inferred:
            raise NeqError(f"cannot tell the type and shape of kept output {out.name!r}")
        out.type.CopyFrom(inferred[out.name].type)
