"""Per-neuron gradient statistics from the portable training model (docs/ALGORITHM.md, "gradnorm" and "fisher").

GradientProbe runs portable_training_model.onnx (standard ONNX: stock onnxruntime and onnxruntime-training
both run it) with every gradient mask at 1 and reads, for every output channel c of every Conv (the
"neurons", flat in manifest layer order):

  grad_norm[c]  the L2 norm of the channel's weight gradient (and its bias gradient, if the conv has a
                bias) for the batch-mean loss L = (1/N) sum_n l_n: what MeDyate's gradnorm selector ranks.
  fisher[c]     TinyTrain's Fisher potential (1/(2N)) sum_n (sum_hw a[n,c,h,w] * g[n,c,h,w])^2, where a is
                the conv's raw output (before BatchNorm and activation) and g[n] the gradient of the
                per-sample loss with respect to a[n]. The graph's loss is the batch mean, so g = N * dL/da,
                with dL/da the gradient the training graph computes anyway. With batch-statistics
                BatchNorm the samples of a batch are coupled, and g[n] is then the gradient of the summed
                per-sample losses sum_m l_m with respect to a[n] (what autograd of a summed loss gives).

The probe adds the raw conv outputs a and their gradients dL/da as graph outputs of one in-memory copy
of the training graph, loaded once. It finds them by the manifest's contract, whatever the graph's node
names: a is the output of the layer's forward Conv (manifest `node`, or the one Conv reading its `weight`),
and dL/da is the value nearest to the layer's `<weight>_grad` (and `<bias>_grad`) outputs that every path
from the label input to them passes through and that has a's shape (the weight gradient is computed from it). It never changes a parameter: parameters are read-only inputs and
nothing is applied to them.

Cost of GradientProbe.measure: one full forward and backward pass of the training graph per batch (the
same work as a training step, minus the optimizer update), plus the memory of every layer's raw
output a and gradient dL/da for that batch (2 * N * sum over layers of C*H*W floats), which ORT must keep
until the run ends instead of freeing them as it goes, and a float64 copy of one layer at a time while
the statistics are reduced.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.manifest import Layer, Manifest, artifact_model, read_manifest
from onnx_neq.ort_runtime import ORT_DTYPES, onnxruntime, session_options

if TYPE_CHECKING:
    import onnx


@dataclass(eq=False)
class ChannelStats:
    """Per-neuron statistics, flat float64 arrays over all neurons in manifest layer order.

    grad_norm  mean over the probed batches of each batch's per-channel gradient norm
    fisher     sum over the probed batches of each batch's Fisher potential (each one already a mean over
               the batch's samples); the selectors only use ratios, so the sum ranks like the mean
    batches    how many batches went into the statistics
    """

    grad_norm: np.ndarray
    fisher: np.ndarray
    batches: int = 1

    def merged(self, other: ChannelStats) -> ChannelStats:
        """These statistics and `other` as if measured together: grad_norm averaged over all batches
        (weighted by each side's batch count), fisher summed, batch counts added."""
        if self.grad_norm.shape != other.grad_norm.shape:
            raise NeqError(
                f"cannot merge gradient statistics over {len(self.grad_norm)} and {len(other.grad_norm)} neurons; "
                "measure both with the same artifacts"
            )
        batches = self.batches + other.batches
        grad_norm = (self.grad_norm * self.batches + other.grad_norm * other.batches) / batches
        return ChannelStats(grad_norm, self.fisher + other.fisher, batches)


def accumulate(stats: Iterable[ChannelStats]) -> ChannelStats:
    """Several ChannelStats as one (see ChannelStats.merged): mean grad_norm over batches, summed fisher."""
    total = None
    for item in stats:
        total = item if total is None else total.merged(item)
    if total is None:
        raise NeqError("no gradient statistics to accumulate: probe at least one batch")
    return total


@dataclass
class _LayerOutputs:
    layer: Layer
    weight_grad: str
    bias_grad: str | None
    activation: str  # the raw conv output a
    activation_grad: str  # dL/da


class GradientProbe:
    """Measures per-neuron gradient norms and Fisher potentials on an artifacts directory.

    Loads portable_training_model.onnx once, adds the raw conv outputs and their gradients as graph
    outputs, and keeps one InferenceSession (CPU, `threads` intra-op threads; 0 = ORT's default).
    Each measure() costs one full forward + backward pass plus the memory of every conv's raw output
    and its gradient for the batch (see the module docstring).
    """

    def __init__(self, artifacts_dir: str | Path, threads: int = 0):
        import onnx

        self.dir = Path(artifacts_dir)
        self.manifest: Manifest = read_manifest(self.dir)
        path = artifact_model(self.dir, self.manifest, "portable_training_model")
        model = onnx.load(str(path))
        index = _GraphIndex.of(model, self.manifest.label_input)
        self.layers = [_layer_outputs(index, model.graph, layer) for layer in self.manifest.layers]
        _add_outputs(model.graph, [n for lo in self.layers for n in (lo.activation, lo.activation_grad)])
        self.session = onnxruntime().InferenceSession(
            model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.inputs = {arg.name: arg for arg in self.session.get_inputs()}
        self.masks = {
            layer.mask_input: np.ones(layer.out_channels, np.float32) for layer in self.manifest.layers if layer.mask_input in self.inputs
        }
        data = {self.manifest.input.name, self.manifest.label_input}
        self.parameter_inputs = [n for n in self.inputs if n not in data and n not in self.masks]
        self.output_names = [n for lo in self.layers for n in (lo.weight_grad, lo.bias_grad, lo.activation, lo.activation_grad) if n]
        self.neurons = sum(layer.out_channels for layer in self.manifest.layers)

    def measure(self, params: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray) -> ChannelStats:
        """grad_norm and fisher of every neuron on one batch (images NCHW float, labels int class indices).

        `params`: every parameter of the artifacts by name (extra entries are ignored), e.g. a backend's
        parameters(); they are read, never written."""
        images = np.asarray(images)
        labels = np.asarray(labels)
        n = self._check_batch(images, labels)
        feeds = {
            self.manifest.input.name: np.ascontiguousarray(images, np.float32),
            self.manifest.label_input: np.ascontiguousarray(labels, np.int64),
        }
        feeds.update(self.masks)
        for name in self.parameter_inputs:
            feeds[name] = self._parameter(params, name)
        try:
            values = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        except Exception as exc:
            raise NeqError(
                f"the gradient probe failed on {self.dir} ({str(exc).splitlines()[0][:160]}); check the batch and the parameters"
            ) from None
        grad_norm, fisher = [], []
        for lo in self.layers:
            channels = lo.layer.out_channels
            squares = np.square(values[lo.weight_grad].astype(np.float64).reshape(channels, -1)).sum(axis=1)
            if lo.bias_grad:
                squares += np.square(values[lo.bias_grad].astype(np.float64).reshape(channels))
            grad_norm.append(np.sqrt(squares))
            a, da = values[lo.activation], values[lo.activation_grad]
            if a.shape != da.shape or a.ndim < 2 or a.shape[:2] != (n, channels):
                raise NeqError(
                    f"layer {lo.layer.name!r}: its output {lo.activation!r} {list(a.shape)} and gradient {lo.activation_grad!r} "
                    f"{list(da.shape)} are not [N={n}, C={channels}, ...]; run `onnx-neq prepare` again"
                )
            # per-sample gradient of the per-sample loss: N times the gradient of the batch-mean loss
            inner = (a.reshape(n, channels, -1).astype(np.float64) * da.reshape(n, channels, -1).astype(np.float64)).sum(axis=2) * n
            fisher.append(np.square(inner).sum(axis=0) / (2 * n))
        return ChannelStats(np.concatenate(grad_norm), np.concatenate(fisher), 1)

    def measure_batches(self, params: dict[str, np.ndarray], batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> ChannelStats:
        """measure() over (images, labels) batches, accumulated: grad_norm averaged over the batches,
        fisher summed (ChannelStats.merged). Costs one forward + backward per batch."""
        return accumulate(self.measure(params, images, labels) for images, labels in batches)

    def _check_batch(self, images: np.ndarray, labels: np.ndarray) -> int:
        shape = self.inputs[self.manifest.input.name].shape
        if images.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape[1:], images.shape[1:])):
            raise NeqError(f"images of shape {list(images.shape)} do not fit the model input {shape}; pass a batch of that shape")
        n = int(images.shape[0])
        if n == 0:
            raise NeqError("the gradient probe got an empty batch; pass at least one image")
        if labels.shape != (n,):
            raise NeqError(f"labels of shape {list(labels.shape)} for {n} images; pass one class index per image")
        if labels.size and (labels.min() < 0 or labels.max() >= self.manifest.num_classes):
            raise NeqError(f"labels must be class indices in [0, {self.manifest.num_classes}); got {labels.min()}..{labels.max()}")
        return n

    def _parameter(self, params: dict[str, np.ndarray], name: str) -> np.ndarray:
        if name not in params:
            raise NeqError(
                f"parameter {name!r} is missing from the parameters given to the gradient probe; pass every parameter of the artifacts"
            )
        arg = self.inputs[name]
        value = np.asarray(params[name], dtype=ORT_DTYPES.get(arg.type))
        # ORT reports an input of unknown rank as shape []: only a known rank is checked
        if (arg.shape and len(arg.shape) != value.ndim) or any(isinstance(d, int) and d != s for d, s in zip(arg.shape, value.shape)):
            raise NeqError(
                f"parameter {name!r} has shape {list(value.shape)}, the model expects {arg.shape}; pass the artifacts' own parameters"
            )
        return value


# reshapes: a same-shaped output of one holds its input's tensor as it is (the weight gradient's computation
# may reshape dY first; dY itself is the value reshaped)
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


@dataclass
class _GraphIndex:
    """What the per-layer lookups need from the whole graph, gathered in one pass: each value's producer (its
    position in the graph's topological order), which values the labels reach (the backward pass: every gradient
    depends on them), and the shapes ONNX shape inference gives."""

    nodes: list
    producer: dict[str, int]  # value -> index of the node that computes it
    outputs: set[str]  # graph outputs
    from_labels: set[str]  # values computed from the label input (the loss and every gradient)
    shapes: dict[str, list]  # value -> dims (ints, symbolic names, None where unknown)

    @classmethod
    def of(cls, model: onnx.ModelProto, label_input: str) -> _GraphIndex:
        import onnx

        graph = model.graph
        nodes = list(graph.node)
        producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
        from_labels = {label_input}
        for node in nodes:
            if any(i in from_labels for i in node.input):
                from_labels.update(o for o in node.output if o)
        try:  # data_prop: the shapes of Expand(dY, Shape(X)) and the like are static too
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True).graph
        except Exception:  # noqa: BLE001 - a best effort: without shapes no gradient is found, and the error names the layer
            inferred = graph
        shapes = {}
        for vi in itertools.chain(inferred.input, inferred.value_info, inferred.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]
        return cls(nodes, producer, {o.name for o in graph.output}, from_labels, shapes)

    def same_shape(self, a: str, b: str) -> bool:
        """Both shapes are known to the rank, equal in their static dims, and symbolic in the same places (shape
        inference names the batch of the backward pass's values afresh)."""
        sa, sb = self.shapes.get(a), self.shapes.get(b)
        if sa is None or sb is None or len(sa) != len(sb) or None in sa or None in sb:
            return False
        return all(x == y if isinstance(x, int) else isinstance(y, str) for x, y in zip(sa, sb))

    def gradient_of(self, activation: str, gradients: list[str]) -> str | None:
        """The gradient dL/da of `activation` a that the parameter gradients `gradients` (a conv's `<weight>_grad`,
        `<bias>_grad`) are computed from: walking back from them, the first value that every path from the labels
        to them passes through and that has a's shape (through reshapes of it back to the value itself: the same data)."""
        found = next((v for v in self._dominators(gradients) if v not in gradients and self.same_shape(v, activation)), None)
        while found is not None:
            node = self.nodes[self.producer[found]] if found in self.producer else None
            source = node.input[0] if node is not None and node.op_type in _RESHAPES and node.input else None
            if source is None or source not in self.from_labels or not self.same_shape(source, activation):
                return found
            found = source
        return None

    def _dominators(self, sinks: list[str]):
        """The values every path from the labels to `sinks` passes through, nearest to the sinks first: the values
        on those paths are visited in reverse topological order, and a value dominates when it is the only one
        left to visit (the pending values always cut every such path)."""

        def order(value: str) -> int:
            return -self.producer.get(value, -1)  # graph inputs come last

        pending = {v for v in sinks if v in self.from_labels}
        heap = [(order(v), v) for v in pending]
        heapq.heapify(heap)
        while heap:
            _, value = heapq.heappop(heap)
            if value not in pending:
                continue
            if len(pending) == 1:
                yield value
            pending.discard(value)
            node = self.nodes[self.producer[value]] if value in self.producer else None
            for name in node.input if node is not None else ():
                if name in self.from_labels and name not in pending:  # never visited yet: it comes earlier in the order
                    pending.add(name)
                    heapq.heappush(heap, (order(name), name))


def _layer_outputs(index: _GraphIndex, graph, layer: Layer) -> _LayerOutputs:
    """The graph values the probe reads for `layer`, found by the manifest's contract alone (its weight and bias
    names, `<param>_grad` outputs, the label input), or NeqError naming the layer."""

    def needed(name: str) -> str:
        if name not in index.outputs:
            raise NeqError(f"layer {layer.name!r}: the portable training model has no output {name!r}; run `onnx-neq prepare` again")
        return name

    weight_grad = needed(layer.weight + "_grad")
    bias_grad = needed(layer.bias + "_grad") if layer.bias else None
    conv = _forward_conv(graph, layer)
    activation = conv.output[0]
    found = index.gradient_of(activation, [g for g in (weight_grad, bias_grad) if g])
    if found is None:
        raise NeqError(
            f"layer {layer.name!r}: cannot find the gradient of its conv output {activation!r} in the portable training model "
            f"(no value of its shape that {weight_grad!r} is computed from); run `onnx-neq prepare` again"
        )
    return _LayerOutputs(layer, weight_grad, bias_grad, activation, found)


def _forward_conv(graph, layer: Layer):
    """The layer's forward Conv: the node named layer.node, else the one Conv reading layer.weight as W."""
    named = [n for n in graph.node if n.op_type == "Conv" and n.name == layer.node]
    if len(named) != 1:
        named = [n for n in graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] == layer.weight]
    if len(named) != 1:
        raise NeqError(
            f"layer {layer.name!r}: the portable training model has {len(named)} forward Convs for node {layer.node!r} "
            f"(weight {layer.weight!r}), expected 1; run `onnx-neq prepare` again"
        )
    return named[0]


def _add_outputs(graph, names: list[str]) -> None:
    """Expose intermediate values as graph outputs (typed from value_info when known, else float)."""
    from onnx import TensorProto, helper

    present = {o.name for o in graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info if v.type.HasField("tensor_type")}
    for name in names:
        if name not in present:
            graph.output.append(helper.make_tensor_value_info(name, types.get(name) or TensorProto.FLOAT, None))
            present.add(name)
