"""Fold the conv layers whose activation is the identity or a constant on the data out of an inference model,
and the single channels that are always OFF on it.

`onnx-neq prune` measures, per conv layer, whether the activation after it is ON for every training image
(then it is the identity on the data) or OFF for every image (then its output is a constant), and which of its
channels are OFF for every image. A layer is named by its conv weight's initializer and is the chain

    Conv(X, W[, b]) -> per-channel affine ops -> activation

The affine ops are an inference-mode BatchNormalization or its decomposed form (Sub / Add / Mul / Div by
per-channel constants, computed from initializers or Constants by Reshape / Sqrt / Add / Div / Cast / Unsqueeze ...):
together y = a * conv(X) + c per channel. The activation is Relu, Clip (ReLU6) or LeakyRelu, or none (a linear
layer such as MobileNetV2's projection). An op the chain cannot read as a per-channel constant affine map
ends it; the layer is then skipped with the reason rather than guessed.

constant  (always OFF, or all-zero weights) the layer's output becomes a constant per channel: 0 for an OFF
          Relu, the lower bound for an OFF Clip; act(a * b + c) for all-zero weights (b: the conv bias or 0).
          It is an initializer [1, C, 1, 1] when every consumer is an Add / Sub / Mul / Div whose other operand
          is computed with the output's full static shape (the broadcast then changes nothing); otherwise Expand
          of it to the output's shape (N from a Shape of the model's input, C, H, W static; the Shape and the
          Concat of a [N, C, H, W] are shared by the constants of that shape). The conv, the affine ops and the
          activation go; downstream nodes stay as they are. Skipped: an OFF LeakyRelu (its OFF side is a
          slope), an OFF layer without activation (nothing is OFF), an output shape that is not static.
identity  (ON on all the data) the layer merges with the Conv that reads its output, which must be that
          output's only consumer (and the output no graph output); both convs group 1. With W1' = a * W1 and
          b1' = a * b1 + c:
            conv2 1x1, stride 1, no padding      W = W2 . W1' (summed over the middle channels), b = W2 b1' + b2,
                                                 with conv1's kernel, strides, pads and dilations;
            conv2 sees a 1x1 map (static shape) and writes a 1x1 map: a single tap of it reads data, the
                                                 others read padding; it is the 1x1 conv of that tap (above).
          The merged conv takes conv2's place and weight name, so a chain of identity layers merges in turn.
          A merge that would make the model larger is not made: the merged weight [O, I, kh, kw] must have no
          more elements than W1 and W2 together (then it costs no more MACs either: both run at conv1's output
          size), which rules out the merge into an expanding 1x1 conv (MobileNetV2's projection into the next
          block's expansion).
          It is exact only where the activation is the identity: the caller's claim about its data.
          Skipped: a kxk conv2 on a map larger than 1x1 (with padding, the zero border of the intermediate map
          is not a linear map of the input; without, the kernel would grow), a strided or padded 1x1 conv2,
          grouped / depthwise convs (the merge would be a dense conv, larger than the two), several consumers,
          a consumer that is not a Conv, a weight shared by several nodes.
off channels  (`off_channels`: per layer, the channels whose Relu or Clip(0, hi) outputs 0 on all the data)
          those channels go from the layer and from the Conv that reads its output, which must be that output's
          only consumer; both convs group 1. The affine map is folded into conv1 (W1' = a * W1, b1' = a * b1 + c,
          the affine ops go), then the channels' rows of W1' and b1' and their input channels (axis 1) of W2 are
          removed; the value_info shapes of conv1's and the activation's outputs get the new channel count.
          Exact whatever conv2's padding: the channels are 0 everywhere, at the border as inside.
          Skipped: every channel OFF (that is a constant layer), an activation whose OFF value is not 0 (none,
          LeakyRelu, a Clip with another lower bound), grouped / depthwise convs on either side, several
          consumers or one that is not a Conv, a layer also listed as identity or constant (its whole-layer
          fold was skipped then: the layer is kept whole; one folded away is not looked at).

Identity layers are folded first, in graph order, then the constant ones, then the OFF channels of the layers
left (FoldReport.dropped_channels), in graph order; after each fold the nodes and initializers nothing needs any
more are removed. A layer whose output fed only layers that became constants is removed with them
(FoldReport.dead). Folding needs no data: `check_equal` compares the original and the folded model with
onnxruntime on the caller's data, which is what makes the claims about the activations good (within float32
rounding, relative to the outputs' magnitude: ORT optimizes the two graphs differently).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_neq.errors import NeqError

ACTIVATIONS = ("Relu", "Clip", "LeakyRelu")
_AFFINE = ("Add", "Sub", "Mul", "Div")
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_MAIN_DOMAINS = ("", "ai.onnx")


@dataclass
class FoldReport:
    folded: list[str]  # conv weights whose layer was merged into the conv after it (identity activation)
    constant: list[str]  # conv weights whose layer was replaced by a constant (always OFF, or all-zero weights)
    skipped: dict[str, str]  # conv weight -> why it could not be folded exactly (kept as is)
    nodes_before: int
    nodes_after: int
    params_before: int  # elements of float initializers
    params_after: int
    dead: list[str] = field(default_factory=list)  # conv weights of layers removed because only constants read them
    dropped_channels: dict[str, int] = field(default_factory=dict)  # conv weight -> always-OFF channels removed


@dataclass
class _Layer:
    weight: str
    conv: onnx.NodeProto
    scale: np.ndarray  # a: y = a * conv(X) + c per output channel (float64)
    shift: np.ndarray  # c
    act: onnx.NodeProto | None
    output: str  # the activation's output, or the last affine op's (the conv's) without activation


def fold_layers(
    model: onnx.ModelProto, identity: set[str], constant: set[str], off_channels: dict[str, np.ndarray] | None = None
) -> tuple[onnx.ModelProto, FoldReport]:
    """A copy of `model` with the `identity` layers merged into the conv after them, the `constant` layers
    replaced by their constant output and the channels `off_channels` marks True (always OFF) removed from the
    other layers (layers named by conv weight), and a report. See the module docstring."""
    folded_model = onnx.ModelProto()
    folded_model.CopyFrom(model)
    g = _Graph(folded_model)
    _check_names(g, identity, constant, set(off_channels or {}))
    off = _off_masks(g, off_channels or {})
    shapes = _static_shapes(model)
    weights_before = set(g.conv_weights())
    nodes_before, params_before = len(model.graph.node), _params(model)
    report = FoldReport([], [], {}, nodes_before, nodes_before, params_before, params_before)
    for weight in g.in_graph_order(identity):
        _record(report, weight, "folded", _merge_into_next(g, weight, shapes))
    for weight in g.in_graph_order(constant):
        if weight in g.conv_weights():  # else removed as dead with a layer folded before it
            _record(report, weight, "constant", _replace_by_constant(g, weight, shapes))
    for weight in g.in_graph_order(set(off)):
        if weight in set(identity) | set(constant):  # its whole-layer fold was skipped (else it is gone): it stays whole
            why = report.skipped.get(weight, "not folded")
            report.skipped[weight] = f"{why}; its OFF channels are kept too: the layer is listed as identity or constant"
            continue
        dropped = _drop_channels(g, weight, off[weight])
        if isinstance(dropped, str):
            report.skipped[weight] = dropped
        else:
            report.dropped_channels[weight] = dropped
    gone = weights_before - set(g.conv_weights()) - set(report.folded) - set(report.constant)
    report.dead = sorted(gone)
    for weight in report.dead:
        report.skipped.pop(weight, None)
    report.nodes_after, report.params_after = len(folded_model.graph.node), _params(folded_model)
    return folded_model, report


def _record(report: FoldReport, weight: str, kind: str, reason: str | None) -> None:
    if reason is None:
        getattr(report, kind).append(weight)
    else:
        report.skipped[weight] = reason


def _check_names(g: _Graph, identity: set[str], constant: set[str], off: set[str]) -> None:
    both = sorted(set(identity) & set(constant))
    if both:
        raise NeqError(
            f"layers {both[:3]} are listed both as identity and as constant; an activation is either ON or OFF, pass each layer once"
        )
    unknown = sorted((set(identity) | set(constant) | off) - set(g.conv_weights()))
    if unknown:
        raise NeqError(
            f"{unknown[:3]} name no Conv weight of the model ({len(unknown)} unknown); "
            "pass the initializer names of the conv weights, e.g. 'layer1.0.conv1.weight'"
        )


def _off_masks(g: _Graph, off_channels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The masks of `off_channels` that mark a channel, checked: a bool vector over the conv's output channels."""
    masks = {}
    for weight, mask in off_channels.items():
        mask, channels = np.asarray(mask), g.inits[weight].dims[0]
        if mask.dtype != bool or mask.shape != (channels,):
            raise NeqError(
                f"off_channels[{weight!r}] is a {mask.dtype} array of shape {list(mask.shape)}; "
                f"pass a bool array over the conv's {channels} output channels, True where the activation is always OFF"
            )
        if mask.any():
            masks[weight] = mask
    return masks


def check_equal(original: onnx.ModelProto, folded: onnx.ModelProto, inputs: np.ndarray, atol: float = 1e-5, rtol: float = 1e-5) -> float:
    """The max |difference| over all outputs of the two models on `inputs` (onnxruntime, CPU); raises NeqError
    where an output differs by more than atol + rtol * its largest |value| in the original: then a layer claimed
    identity (constant) is not the identity (constant) on these inputs, or a channel claimed OFF is not OFF.

    The rtol term is float32 rounding. ORT fuses the folded graph otherwise than the original (a constant added to
    a map goes into the conv's bias that computes it, a merged conv sums in another order), which moves each output
    by ulps of its magnitude. A pruned net's logits can be huge (BatchNorm scales ~300 from tiny running variances:
    ResNet-18's reach 6e7, where an ulp is 4), so no absolute tolerance holds; ORT's optimization levels alone move
    that model's logits by 9e-7 of their largest."""
    expected, got = _run(original, inputs), _run(folded, inputs)
    if list(expected) != list(got):
        raise NeqError(f"the folded model's outputs {list(got)} are not the original's {list(expected)}; fold the original model again")
    diff, over = 0.0, None
    for name, want in expected.items():
        if want.shape != got[name].shape:
            raise NeqError(f"output {name} has shape {list(got[name].shape)} after folding, {list(want.shape)} before; fold fewer layers")
        if want.size:
            want64 = want.astype(np.float64)
            here = float(np.max(np.abs(want64 - got[name].astype(np.float64))))
            allowed = atol + rtol * float(np.max(np.abs(want64)))
            diff = max(diff, here)
            if over is None and not here <= allowed:  # NaN included
                over = (name, here, allowed)
    if over is not None:
        raise NeqError(
            f"the folded model's output {over[0]} differs from the original's by {over[1]:.3g} (> {atol:g} + {rtol:g} * its largest "
            f"|value| = {over[2]:.3g}) on these inputs: a layer passed as identity is not the identity on them (or one passed as "
            "constant is not constant, or a channel passed as OFF is not OFF); measure the activations on these inputs"
        )
    return diff


def _run(model: onnx.ModelProto, inputs: np.ndarray) -> dict[str, np.ndarray]:
    from onnx_neq.ort_runtime import inference_session

    session = inference_session(model)
    feed = session.get_inputs()
    if len(feed) != 1:
        raise NeqError(f"the model has {len(feed)} inputs ({[i.name for i in feed]}); check_equal feeds one image batch")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {feed[0].name: np.asarray(inputs)})))


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims, dtype=np.int64)) for i in model.graph.initializer if i.data_type in _FLOAT_TYPES)


# the graph ------------------------------------------------------------------------------------------------------


class _Graph:
    """The model's main graph with its producers, consumers and constant values, re-read after each change."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in _MAIN_DOMAINS), 17)
        self.refresh()

    def refresh(self) -> None:
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {out: node for node in self.graph.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in _node_inputs(node):
                self.consumers[name].append(node)
        self.outputs = {o.name for o in self.graph.output}
        self._values: dict[str, np.ndarray | None] = {}

    def conv_weights(self) -> list[str]:
        return [n.input[1] for n in self.graph.node if _is_conv(n) and n.input[1] in self.inits]

    def in_graph_order(self, weights: set[str]) -> list[str]:
        return [w for w in self.conv_weights() if w in weights]

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def const(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is an initializer or computed from initializers by ops `_evaluate` knows."""
        if not name:
            return None
        if name not in self._values:
            self._values[name] = None  # no cycles
            if name in self.inits:
                self._values[name] = _widen(numpy_helper.to_array(self.inits[name]))
            elif name in self.producer:
                self._values[name] = _evaluate(self, self.producer[name])
        return self._values[name]

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(array, name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)

    def fresh_name(self, base: str) -> str:
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.graph.input}
        name, n = base, 0
        while name in taken:
            n += 1
            name = f"{base}.{n}"
        return name

    def uses(self, name: str) -> int:
        return len(self.consumers.get(name, [])) + (name in self.outputs)

    def prune(self) -> None:
        """Remove the nodes, initializers and value_info nothing needs for the graph outputs; re-read."""
        needed = set(self.outputs)
        keep = []
        for node in reversed(self.graph.node):
            if any(out in needed for out in node.output if out):
                keep.append(node)
                needed.update(_node_inputs(node))
        _set_nodes(self.graph, keep[::-1])
        inits = [i for i in self.graph.initializer if i.name in needed]
        del self.graph.initializer[:]
        self.graph.initializer.extend(inits)
        produced = {out for node in self.graph.node for out in node.output}
        infos = [v for v in self.graph.value_info if v.name in produced]
        del self.graph.value_info[:]
        self.graph.value_info.extend(infos)
        self.refresh()


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """The values a node reads, those its subgraphs (If / Loop bodies) read from outside included."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in list(attr.g.node if attr.HasField("g") else []) + [n for g in attr.graphs for n in g.node]:
            names |= _node_inputs(sub)
    return names


def _is_conv(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and node.domain in _MAIN_DOMAINS and len(node.input) >= 2


def _widen(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if array.dtype.kind == "f" else array


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """name -> dims (int, a symbolic dim's name, or None) as onnx shape inference sees them; {} if it fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference cannot read: no static shapes, the folds that need them skip
        return {}
    shapes = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return shapes


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# constant values ------------------------------------------------------------------------------------------------

_ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
_UNARY = {"Identity": lambda x: x, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative}


def _evaluate(g: _Graph, node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a node's single output from constant inputs, for the ops BatchNorm constants and Clip bounds
    are built of (float arithmetic in float64; a Cast rounds to its type first); None for any other node."""
    if node.domain not in _MAIN_DOMAINS or len(node.output) != 1:
        return None
    if node.op_type == "Constant":
        return _constant_attribute(node)
    args = [g.const(i) for i in node.input]
    if not args or args[0] is None or (node.op_type in _ARITHMETIC and any(a is None for a in args)):
        return None
    try:
        return _apply(node, args)
    except (ValueError, TypeError):  # a Reshape to the wrong size, a Cast without `to`: not a constant we read
        return None


def _constant_attribute(node: onnx.NodeProto) -> np.ndarray | None:
    for name, dtype in (
        ("value", None),
        ("value_float", np.float64),
        ("value_floats", np.float64),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        value = _attr(node, name)
        if value is not None:
            return _widen(numpy_helper.to_array(value)) if dtype is None else np.asarray(value, dtype)
    return None


def _apply(node: onnx.NodeProto, args: list) -> np.ndarray | None:
    op, x = node.op_type, args[0]
    if op in _UNARY:
        return _UNARY[op](x) if x.dtype.kind == "f" else None
    if op in _ARITHMETIC:
        return _ARITHMETIC[op](x, args[1]) if all(a.dtype.kind == "f" for a in args) else None
    if op == "Reshape" and len(args) == 2 and args[1] is not None:
        return x.reshape(_reshape_target(x.shape, args[1], _attr(node, "allowzero", 0)))
    if op == "Cast":
        return _widen(x.astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to"))))
    if op in ("Unsqueeze", "Squeeze"):
        axes = args[1] if len(args) > 1 and args[1] is not None else _attr(node, "axes")
        axes = None if axes is None else tuple(int(a) for a in np.reshape(axes, -1))
        if op == "Unsqueeze":
            return None if axes is None else np.expand_dims(x, axes)
        return np.squeeze(x, axis=axes)
    return None


def _reshape_target(shape: tuple[int, ...], target: np.ndarray, allowzero: int) -> list[int]:
    dims = [int(d) for d in np.reshape(target, -1)]
    return [shape[i] if d == 0 and not allowzero else d for i, d in enumerate(dims)]


# layers ---------------------------------------------------------------------------------------------------------


def _find_layer(g: _Graph, weight: str) -> _Layer | str:
    """The layer of conv weight `weight`: its conv, the per-channel affine map after it and its activation."""
    convs = [n for n in g.consumers.get(weight, []) if _is_conv(n) and n.input[1] == weight]
    if len(convs) != 1 or g.uses(weight) != 1:
        return "its weight is used by several nodes: folding one use would change the others"
    conv = convs[0]
    channels, rank = g.inits[weight].dims[0], len(g.inits[weight].dims)
    scale, shift = np.ones(channels), np.zeros(channels)
    value, node = conv.output[0], None
    while True:
        node = g.sole_consumer(value)
        step = _affine_step(g, node, value, channels, rank) if node is not None else None
        if step is None:
            break
        scale, shift = scale * step[0], shift * step[0] + step[1]
        value = node.output[0]
    act = node if node is not None and node.op_type in ACTIVATIONS and node.domain in _MAIN_DOMAINS and node.input[0] == value else None
    if act is not None and (act.op_type == "Clip" and _clip_bounds(g, act) is None):
        return "its Clip bounds are not constants"
    return _Layer(weight, conv, scale, shift, act, act.output[0] if act is not None else value)


def _affine_step(g: _Graph, node: onnx.NodeProto, value: str, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(m, k) such that node(x) = m * x + k per channel, if `node` is such a map of `value`; else None."""
    if node.domain not in _MAIN_DOMAINS or len([o for o in node.output if o]) != 1:
        return None
    if node.op_type == "BatchNormalization":
        if _attr(node, "training_mode", 0) or len(node.input) < 5 or node.input[0] != value:
            return None
        s, b, mean, var = (_vector(g.const(n), channels) for n in node.input[1:5])
        if s is None or b is None or mean is None or var is None:
            return None
        k = s / np.sqrt(var + _attr(node, "epsilon", 1e-5))
        return k, b - mean * k
    if node.op_type not in _AFFINE or len(node.input) != 2 or list(node.input).count(value) != 1:
        return None
    first = node.input[0] == value
    other = _per_channel(g.const(node.input[1 if first else 0]), channels, rank)
    if other is None:
        return None
    one, zero = np.ones(channels), np.zeros(channels)
    if node.op_type == "Add":
        return one, other
    if node.op_type == "Sub":
        return (one, -other) if first else (-one, other)
    if node.op_type == "Mul":
        return other, zero
    return (1.0 / other, zero) if first else None  # c / x is no affine map


def _per_channel(array: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """`array` as a [channels] vector if it broadcasts against [N, channels, spatial...] (`rank` dims) along
    the channels only ([1, C, 1, 1], [C, 1, 1], a scalar); else None."""
    if array is None or array.dtype.kind != "f" or array.ndim > rank:
        return None
    dims = (1,) * (rank - array.ndim) + array.shape
    if dims[0] != 1 or any(d != 1 for d in dims[2:]) or dims[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).astype(np.float64)


def _vector(array: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A BatchNormalization parameter: [channels] floats."""
    return array.reshape(-1).astype(np.float64) if array is not None and array.dtype.kind == "f" and array.size == channels else None


def _clip_bounds(g: _Graph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """(lo, hi) of a Clip (inputs from opset 11, attributes before); None if a bound is not a constant."""
    if g.opset < 11:
        return float(_attr(node, "min", -np.inf)), float(_attr(node, "max", np.inf))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        name = node.input[i] if len(node.input) > i else ""
        value = g.const(name) if name else np.array(default)
        if value is None or value.size != 1:
            return None
        bounds.append(float(value.reshape(-1)[0]))
    return bounds[0], bounds[1]


def _activate(g: _Graph, act: onnx.NodeProto | None, z: np.ndarray) -> np.ndarray:
    if act is None:
        return z
    if act.op_type == "Relu":
        return np.maximum(z, 0.0)
    if act.op_type == "LeakyRelu":
        return np.where(z >= 0, z, _attr(act, "alpha", 0.01) * z)
    lo, hi = _clip_bounds(g, act)
    return np.minimum(np.maximum(z, lo), hi)


def _folded_conv1(g: _Graph, layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
    """Conv1's weight and bias with the affine map folded in: W1' = a * W1, b1' = a * b1 + c (float64)."""
    w = g.const(layer.weight)
    bias = g.const(layer.conv.input[2]) if len(layer.conv.input) > 2 and layer.conv.input[2] else None
    b = np.zeros(w.shape[0]) if bias is None else bias.reshape(-1)
    return w * layer.scale.reshape((-1,) + (1,) * (w.ndim - 1)), layer.scale * b + layer.shift


# identity: merge with the next conv -----------------------------------------------------------------------------


def _merge_into_next(g: _Graph, weight: str, shapes: dict) -> str | None:
    """Merge the layer of `weight` into the conv that reads its output; None, or why it cannot be done exactly."""
    layer = _find_layer(g, weight)
    if isinstance(layer, str):
        return layer
    nxt = _next_conv(g, layer, "merging into one")
    if isinstance(nxt, str):
        return nxt
    w2 = g.const(nxt.input[1])
    groups = (_attr(layer.conv, "group", 1), _attr(nxt, "group", 1))
    if groups != (1, 1):
        return f"grouped conv (group {groups[0]} then {groups[1]}): the merge would be a dense conv, larger than the two"
    tap = _one_by_one(nxt, w2.shape[2:], shapes.get(layer.output))
    if isinstance(tap, str):
        return tap
    bias2 = g.const(nxt.input[2]) if len(nxt.input) > 2 and nxt.input[2] else None
    if bias2 is None and len(nxt.input) > 2 and nxt.input[2]:
        return "the next conv's bias is not a constant"
    w1, b1 = _folded_conv1(g, layer)
    w2m = w2[(slice(None), slice(None)) + tap]  # [O, M]
    w = (w2m @ w1.reshape(w1.shape[0], -1)).reshape((w2.shape[0],) + w1.shape[1:])
    if w.size > w1.size + w2.size:
        return f"the merged conv would be larger ({w.size} weights) than the two convs ({w1.size} + {w2.size}): not merged"
    b = w2m @ b1 + (0.0 if bias2 is None else bias2.reshape(-1))
    dtype = _dtype(g, nxt.input[1])
    _replace_conv(g, layer.conv, nxt, w.astype(dtype), b.astype(dtype))
    return None


def _next_conv(g: _Graph, layer: _Layer, change: str) -> onnx.NodeProto | str:
    """The Conv that alone reads the layer's output, as its data input, with a weight initializer of its own;
    else why there is none (`change`: what a fold would do to one consumer, for the message)."""
    users = g.consumers.get(layer.output, [])
    if layer.output in g.outputs:
        return "its output is a graph output"
    if len(users) != 1:
        return f"its output has {len(users)} consumers ({', '.join(sorted({u.op_type for u in users}))}): {change} would change the others"
    nxt = users[0]
    if not _is_conv(nxt) or nxt.input[0] != layer.output or layer.output in nxt.input[1:]:
        return f"its output goes to a {nxt.op_type} node, not into a Conv's input (activations folded: {', '.join(ACTIVATIONS)})"
    if nxt.input[1] not in g.inits or g.uses(nxt.input[1]) != 1 or g.const(nxt.input[1]) is None:
        return "the next conv's weight is not an initializer of its own"
    return nxt


def _dtype(g: _Graph, name: str) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(g.inits[name].data_type)


def _one_by_one(conv2: onnx.NodeProto, kernel: tuple[int, ...], in_dims: list | None) -> tuple[int, ...] | str:
    """The tap of conv2 that reads data if conv2 acts as a 1x1 conv (stride 1, no padding; or a 1x1 map in and
    out, where one tap reads the map and the others padding); else why it does not."""
    n = len(kernel)
    strides, dilations = _attr(conv2, "strides", [1] * n), _attr(conv2, "dilations", [1] * n)
    pads, auto_pad = _attr(conv2, "pads", [0] * 2 * n), _attr(conv2, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides) and (not any(pads) or auto_pad == "VALID"):
        return (0,) * n
    size = "x".join(str(d) for d in in_dims[2:]) if in_dims and len(in_dims) == n + 2 else "unknown"
    if size != "x".join(["1"] * n):
        if all(k == 1 for k in kernel):
            return f"the next conv is a 1x1 conv with stride {list(strides)} or padding {list(pads)} on a {size} map: not merged"
        if auto_pad not in ("NOTSET", "VALID") or any(pads):
            return (
                f"{'x'.join(map(str, kernel))} conv after a conv with padding on a {size} map: the zero padding of the "
                "intermediate map is not a linear map of the input"
            )
        return f"{'x'.join(map(str, kernel))} conv after a conv on a {size} map: the merged kernel would grow, not merged"
    if auto_pad != "NOTSET":
        return f"the next conv reads a 1x1 map with auto_pad {auto_pad}: give it explicit pads"
    tap = []
    for k, s, d, before, after in zip(kernel, strides, dilations, pads[:n], pads[n:]):
        out = (1 + before + after - d * (k - 1) - 1) // s + 1
        if out != 1 or before % d or not 0 <= before // d < k:
            return f"the next conv reads a 1x1 map but writes {out} positions (pads {list(pads)}): no single tap reads the data"
        tap.append(before // d)
    return tuple(tap)


def _replace_conv(g: _Graph, conv1: onnx.NodeProto, conv2: onnx.NodeProto, w: np.ndarray, b: np.ndarray) -> None:
    """Conv2 becomes Conv(conv1's input, w, b) with conv1's attributes, under conv2's names; dead nodes go."""
    weight = conv2.input[1]
    bias = _own_bias(g, conv2)
    g.set_initializer(weight, w)
    g.set_initializer(bias, b)
    merged = helper.make_node("Conv", [conv1.input[0], weight, bias], list(conv2.output), name=conv2.name or None)
    merged.attribute.extend(a for a in conv1.attribute if a.name != "kernel_shape")
    merged.attribute.append(helper.make_attribute("kernel_shape", list(w.shape[2:])))
    conv2.CopyFrom(merged)
    g.prune()


def _own_bias(g: _Graph, conv: onnx.NodeProto) -> str:
    """The name a rewritten `conv`'s bias takes: its bias initializer where no other node reads it, else a new name
    beside its weight's (W.weight -> W.bias)."""
    bias = conv.input[2] if len(conv.input) > 2 else ""
    if bias in g.inits and g.uses(bias) == 1:
        return bias
    weight = conv.input[1]
    return g.fresh_name(weight[: -len(".weight")] + ".bias" if weight.endswith(".weight") else weight + ".bias")


# constant: replace the output -----------------------------------------------------------------------------------


def _replace_by_constant(g: _Graph, weight: str, shapes: dict) -> str | None:
    """Replace the output of the layer of `weight` by its constant value; None, or why it cannot be done."""
    layer = _find_layer(g, weight)
    if isinstance(layer, str):
        return layer
    values = _constant_values(g, layer)
    if isinstance(values, str):
        return values
    out, dims, rank = layer.output, shapes.get(layer.output), len(g.inits[weight].dims)
    if not dims or len(dims) != rank or any(not isinstance(d, int) for d in dims[1:]):
        return f"the shape of its output ({dims or 'unknown'}) is not static past the batch dim: cannot size the constant"
    small = values.astype(_dtype(g, weight)).reshape((1, -1) + (1,) * (rank - 2))
    if _broadcast_is_enough(g, out, dims, shapes):
        nodes, inits = [], {out: small}
    else:
        plan = _expand_nodes(g, out, small, dims)
        if isinstance(plan, str):
            return plan
        nodes, inits = plan
    for name, array in inits.items():
        g.set_initializer(name, array)
    old = list(g.graph.node)
    at = next(i for i, node in enumerate(old) if out in node.output)
    shared, own = nodes[:-1], nodes[-1:]  # the Shape / Concat other constants may share: as early as they can be
    reads = {name for node in shared for name in node.input}
    first = max((i + 1 for i, node in enumerate(old[:at]) if reads & set(node.output)), default=0)
    _set_nodes(g.graph, old[:first] + shared + old[first:at] + own + old[at + 1 :])
    g.prune()
    return None


def _constant_values(g: _Graph, layer: _Layer) -> np.ndarray | str:
    """The layer's output per channel: act(a * b + c) for all-zero weights, the activation's OFF value else."""
    w1, b1 = _folded_conv1(g, layer)
    if not np.any(w1):  # conv(X) = its bias everywhere, padding included
        return _activate(g, layer.act, b1)
    if layer.act is None:
        return "no Relu / Clip after the conv and its weights are not all zero: its output is not constant"
    if layer.act.op_type == "LeakyRelu":
        return "an OFF LeakyRelu is a slope (alpha * x), not a constant"
    lo = 0.0 if layer.act.op_type == "Relu" else _clip_bounds(g, layer.act)[0]
    if not np.isfinite(lo):
        return "its Clip has no lower bound: OFF has no constant value"
    return np.full(layer.scale.shape, lo)


def _broadcast_is_enough(g: _Graph, out: str, dims: list, shapes: dict) -> bool:
    """Whether a [1, C, 1, 1] constant gives every consumer of `out` what the full map did: each is an
    elementwise Add / Sub / Mul / Div whose other operand is computed and has the full (static or same
    symbolic) shape; not an initializer, which may be another layer's [1, C, 1, 1] constant."""
    users = g.consumers.get(out, [])
    if out in g.outputs or not users or None in dims:
        return False
    for node in users:
        if node.op_type not in _AFFINE or node.domain not in _MAIN_DOMAINS or list(node.input).count(out) != 1:
            return False
        other = node.input[1] if node.input[0] == out else node.input[0]
        if other in g.inits or shapes.get(other) != dims:  # an initializer: maybe a constant put in before
            return False
    return True


def _expand_nodes(g: _Graph, out: str, small: np.ndarray, dims: list) -> tuple[list, dict] | str:
    """Nodes and initializers computing `out` = Expand(small, [N, C, H, W]), N read from the model input that
    has the same symbolic batch dim (or static); or why it cannot be sized. The Shape of the input and the
    Concat of each [N, C, H, W] are shared by the constants of a model (named after the input and the dims)."""
    value = g.fresh_name(out + ".constant")
    if isinstance(dims[0], int):
        shape = g.fresh_name(out + ".constant_shape")
        return [helper.make_node("Expand", [value, shape], [out])], {value: small, shape: np.array(dims, np.int64)}
    source = next((i.name for i in g.graph.input if _first_dim(i) == dims[0] and i.name not in g.inits), None)
    if source is None or g.opset < 15:
        return f"its batch dim {dims[0]!r} is no model input's first dim (or the opset is below 15): cannot size the constant"
    size = "x".join(str(d) for d in dims[1:])
    batch, tail, shape = f"{source}.neq_batch", f"{source}.neq_dims_{size}", f"{source}.neq_shape_{size}"
    nodes, inits = [], {value: small}
    if batch not in g.producer:
        nodes.append(helper.make_node("Shape", [source], [batch], start=0, end=1))
    if shape not in g.producer:
        nodes.append(helper.make_node("Concat", [batch, tail], [shape], axis=0))
        inits[tail] = np.array(dims[1:], np.int64)
    nodes.append(helper.make_node("Expand", [value, shape], [out]))
    return nodes, inits


def _first_dim(value: onnx.ValueInfoProto) -> int | str | None:
    dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
    return (dims[0].dim_value if dims[0].HasField("dim_value") else dims[0].dim_param or None) if len(dims) else None


def _set_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]  # detached from the old container
    del graph.node[:]
    graph.node.extend(copies)


# off channels: remove them ----------------------------------------------------------------------------------------


def _drop_channels(g: _Graph, weight: str, off: np.ndarray) -> int | str:
    """Remove the `off` output channels of the layer of `weight` (its affine map folded into its conv first) and
    the matching input channels of the conv after it; how many went, or why it cannot be done exactly."""
    layer = _find_layer(g, weight)
    if isinstance(layer, str):
        return layer
    nxt = _drop_target(g, layer, off)
    if isinstance(nxt, str):
        return nxt
    conv, keep = layer.conv, ~off
    w1, b1 = _folded_conv1(g, layer)
    w2, w2_name = g.const(nxt.input[1]), nxt.input[1]
    bias = _own_bias(g, conv)
    g.set_initializer(weight, w1[keep].astype(_dtype(g, weight)))
    g.set_initializer(bias, b1[keep].astype(_dtype(g, weight)))
    g.set_initializer(w2_name, w2[:, keep].astype(_dtype(g, w2_name)))
    del conv.input[2:]
    conv.input.append(bias)
    layer.act.input[0] = conv.output[0]  # the affine ops, folded into the conv, are left without a reader
    _set_channels(g.graph, {conv.output[0], layer.output}, int(keep.sum()))
    g.prune()
    return int(off.sum())


def _drop_target(g: _Graph, layer: _Layer, off: np.ndarray) -> onnx.NodeProto | str:
    """The conv after the layer whose input channels go with the layer's `off` channels; else why none can go."""
    if off.all():
        return "every channel is OFF: the layer is a constant (pass it in `constant`)"
    act = layer.act
    if act is None:
        return "no Relu / Clip after the conv: no channel of it is OFF"
    if act.op_type == "LeakyRelu":
        return "an OFF LeakyRelu is a slope (alpha * x), not 0: its channels do not vanish"
    lo = 0.0 if act.op_type == "Relu" else _clip_bounds(g, act)[0]
    if lo != 0.0:
        return f"its Clip's lower bound is {lo:g}, not 0: an OFF channel is {lo:g}, not 0 (the next conv's zero padding differs)"
    bias = layer.conv.input[2] if len(layer.conv.input) > 2 else ""
    if bias and g.const(bias) is None:
        return "its conv's bias is not a constant"
    nxt = _next_conv(g, layer, "dropping channels for one")
    if isinstance(nxt, str):
        return nxt
    groups = (_attr(layer.conv, "group", 1), _attr(nxt, "group", 1))
    if groups != (1, 1):
        return f"grouped conv (group {groups[0]} then {groups[1]}): a channel cannot go from its group alone"
    return nxt


def _set_channels(graph: onnx.GraphProto, names: set[str], channels: int) -> None:
    """The channel dim (1) of the value_info shapes of `names` set to `channels`."""
    for value in graph.value_info:
        dims = value.type.tensor_type.shape.dim if value.name in names and value.type.HasField("tensor_type") else []
        if len(dims) > 1:
            dims[1].Clear()
            dims[1].dim_value = channels
