"""Normalization before prepare: third-party classifiers into the shape ORT 1.19.2 trains.

dims written as -1 -> named dynamic dims                       (Paddle2ONNX's dynamic batch)
opset != 17 -> onnx's version converter to 17, IR version 8   (IR <= 10 is what ORT 1.19.2 reads)
shapes -> onnx's shape inference filled in                      (ShapeInferencePass, where it succeeds)
Constant / ConstantOfShape weights -> initializers             (ConstantWeightsPass)
graph inputs that are initializers -> removed                   (RemoveInitializersFromInputsPass)
unused initializers -> removed
unnamed nodes -> named <op>_<index> (layers, taps and BatchNorm matching find Convs by name)
several outputs -> the first, if it holds class scores [N, K] (the others and what only they need
    are dropped, and reported), else one line naming them
Softmax / LogSoftmax at the output -> removed for training      (OutputActivationPass)
(ops without an ORT gradient are rewritten by prepare after it has grouped the parameters, so
that e.g. a PRelu slope stays a trainable parameter: ActivationRewritePass)
dynamic spatial input dims -> fixed by --input-shape (the batch dimension stays dynamic); static ones
    -> changed by it where the network runs at the new size (a fully convolutional one), else one line
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveInitializersFromInputsPass, RemoveUnusedNodesPass, ShapeInferencePass

from onnx_neq.errors import NeqError
from onnx_neq.graph.passes.constant_weights import ConstantWeightsPass
from onnx_neq.graph.passes.output_activation import OutputActivationPass
from onnx_neq.model_io import default_opset

TARGET_OPSET = 17
TARGET_IR = 8


@dataclass
class NormalizeReport:
    opset: tuple[int, int] | None = None  # (from, to) when converted
    lifted_weights: int = 0
    output_activation: dict | None = None
    rewritten: dict[str, int] = field(default_factory=dict)
    input_shape: list[int] | None = None
    dropped_outputs: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        if self.opset:
            out.append(f"opset      converted {self.opset[0]} -> {self.opset[1]} (IR version {TARGET_IR})")
        if self.lifted_weights:
            out.append(f"weights    {self.lifted_weights} Constant/ConstantOfShape outputs became initializers")
        if self.dropped_outputs:
            out.append(f"outputs    dropped {', '.join(map(repr, self.dropped_outputs))}: onnx-neq trains and writes the first output only")
        if self.output_activation:
            out.append(
                f"output     {self.output_activation['op']} removed for training (the loss takes logits); the inference model gets it back"
            )
        for op, n in self.rewritten.items():
            out.append(f"rewrite    {n} {op} node(s) as differentiable ops")
        if self.input_shape:
            out.append(f"input      spatial dims fixed: {self.input_shape}")
        return out


def convert_opset(proto: onnx.ModelProto, report: NormalizeReport) -> onnx.ModelProto:
    """The model at opset 17 and an IR version ORT reads (onnx's version converter takes a ModelProto)."""
    _free_negative_dims(proto.graph)
    opset = default_opset(proto)
    if opset != TARGET_OPSET:
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, TARGET_OPSET)
        except Exception as exc:
            raise NeqError(
                f"cannot convert the model from opset {opset} to {TARGET_OPSET} ({str(exc).splitlines()[0][:200]}); re-export it with opset 17"
            ) from None
        report.opset = (opset, TARGET_OPSET)
    proto.ir_version = min(proto.ir_version, TARGET_IR) if report.opset is None else TARGET_IR
    return proto


# onnx.shape_inference.infer_shapes' defaults; the pass leaves the model as it is where inference fails
_SHAPE_INFERENCE = ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)
_SHAPE_INFERENCE_LOG = logging.getLogger("onnx_ir.passes.common.shape_inference")


def infer_shapes(model: ir.Model) -> bool:
    """onnx's shape inference into `model`, in place; whether a shape or type changed. A failure leaves the
    model as it is and is no error (shapes are a convenience here; ORT infers them again), so the pass's warning
    about it (onnx-ir 1.1.0 logs the whole traceback) is not shown. The pass sets the initializers over 1 kB
    aside and registers them again last: their order, the order of the parameters in the artifacts, is put back."""
    order = list(model.graph.initializers.values())
    _SHAPE_INFERENCE_LOG.addFilter(_no_record)
    try:
        modified = _SHAPE_INFERENCE(model).modified
    finally:
        _SHAPE_INFERENCE_LOG.removeFilter(_no_record)
    if list(model.graph.initializers.values()) != order:
        for value in order:
            del model.graph.initializers[value.name]
            model.graph.initializers.add(value)
    return modified


def _no_record(record: logging.LogRecord) -> bool:
    return False


def _free_negative_dims(graph: onnx.GraphProto) -> None:
    """A dim written as -1 (Paddle2ONNX's dynamic batch) is a named dynamic dim, as ONNX spells one:
    shape inference and ORT's gradient builder take -1 for a size."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = "batch" if index == 0 else f"{value.name}.dim{index}"


def normalize(model: ir.Model, report: NormalizeReport, input_shape: list[int] | None = None) -> None:
    """The graph passes, in place."""
    infer_shapes(model)
    RemoveInitializersFromInputsPass()(model)  # IR < 4 lists every initializer as a graph input too
    _name_nodes(model)
    report.dropped_outputs = _keep_first_output(model)
    report.lifted_weights = len(ConstantWeightsPass()(model).report.lifted)
    _drop_unused_initializers(model)
    report.output_activation = OutputActivationPass()(model).report.removed
    _flatten_logits(model, report)
    if input_shape:
        _fix_input_shape(model, input_shape)
        report.input_shape = input_shape


def _flatten_logits(model: ir.Model, report: NormalizeReport) -> None:
    """Logits [N, K, 1, 1] (a 1x1 Conv head + global pooling) -> Flatten -> [N, K] for the loss."""
    out = model.graph.outputs[0]
    if out.shape is None or out.shape.rank() <= 2 or any(d != 1 for d in out.shape[2:]):
        return
    flat = ir.Value(name=out.name + ".flat", type=out.type, shape=ir.Shape([out.shape[0], out.shape[1]]))
    ir.tape.Tape(model.graph).op("Flatten", [out], attributes={"axis": 1}, name="neq.flatten_logits", output=flat)  # appended
    model.graph.outputs[0] = flat
    report.rewritten["Flatten (4-D logits)"] = 1


def _keep_first_output(model: ir.Model) -> list[str]:
    """A model with several outputs keeps its first when that is [N, K] (K > 1, any further dims 1):
    the names of the dropped ones. Anything else is ambiguous, so one line naming every output."""
    outputs = list(model.graph.outputs)
    if len(outputs) < 2:
        return []
    if not _class_scores(outputs[0].shape):
        named = ", ".join(f"'{v.name}' {_shape_text(v.shape)}" for v in outputs)
        raise NeqError(
            f"the model has {len(outputs)} outputs ({named}); onnx-neq trains the first, which must be the class scores "
            "[N, classes]: re-export the model with the classifier's output first (or only)"
        )
    del model.graph.outputs[1:]
    RemoveUnusedNodesPass()(model)
    return [v.name for v in outputs[1:]]


def _class_scores(shape: ir.Shape | None) -> bool:
    if shape is None or shape.rank() < 2 or not isinstance(shape[1], int):
        return False
    return shape[1] > 1 and all(d == 1 for d in shape[2:])


def _shape_text(shape: ir.Shape | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"


def _name_nodes(model: ir.Model) -> None:
    """Give every unnamed node of the main graph a unique name <op>_<index> (exporters may leave names out).

    Not onnx-ir's NameFixPass: it would also rename named nodes that share a name, and a named node whose
    name an earlier unnamed node took (layers, taps, manifests and BatchNorm matching refer to the names the
    exporter wrote), give omitted optional outputs ("") a name, and name the unnamed nodes node, node_1, ...
    where manifests written so far have <op>_<index>."""
    taken = {node.name for node in model.graph if node.name}
    for index, node in enumerate(model.graph):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _drop_unused_initializers(model: ir.Model) -> None:
    """Initializers nothing reads. Not onnx-ir's RemoveUnusedNodesPass: it would also remove nodes whose outputs
    nothing reads and drop unread optional outputs (a MaxPool's Indices, an inference BatchNorm's statistics)."""
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def _fix_input_shape(model: ir.Model, shape: list[int]) -> None:
    value = model.graph.inputs[0]
    if len(shape) != 4:
        raise NeqError(f"--input-shape takes N,C,H,W (4 numbers), not {shape}")
    old = value.shape
    value.shape = ir.Shape(["batch", *shape[1:]])
    if old is not None and list(old[1:]) != list(shape[1:]):  # a new size: shapes inferred for the old one are stale
        outputs = set(model.graph.outputs)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for out in node.outputs:
                if out not in outputs or (out.shape is not None and out.shape.rank() > 2):
                    out.shape = None
        _check_new_size(model, old, shape)


def _check_new_size(model: ir.Model, old: ir.Shape, shape: list[int]) -> None:
    """One forward pass of a zero image at the new size: a network with sizes baked in (a Flatten into a
    Gemm of fixed width, a Reshape to constants) fails here, in one line, not in training."""
    from onnx_neq.ort_runtime import inference_session, onnxruntime

    value = model.graph.inputs[0]
    try:
        session = inference_session(ir.serde.serialize_model(model), threads=1)
        dtype = value.type.dtype.numpy() if value.type is not None else np.float32
        quiet = onnxruntime().RunOptions()
        quiet.log_severity_level = 4  # the error is ours to report, in one line
        session.run(None, {value.name: np.zeros([1, *shape[1:]], dtype)}, quiet)
    except Exception as error:  # onnx and onnxruntime raise their own types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        was = "x".join(str(d) for d in old[2:])
        raise NeqError(
            f"--input-shape {','.join(map(str, shape))}: this model was built for {was} inputs and does not run at "
            f"{'x'.join(map(str, shape[2:]))} ({first[:200]}); keep {was}, or export the model at the size you want"
        ) from None
