"""Normalization before prepare: third-party classifiers into the shape ORT 1.19.2 trains.

opset != 17 -> onnx's version converter to 17, IR version 8   (IR <= 10 is what ORT 1.19.2 reads)
Constant / ConstantOfShape weights -> initializers             (ConstantWeightsPass)
unused initializers and graph inputs that are initializers -> removed
Softmax / LogSoftmax at the output -> removed for training      (OutputActivationPass)
(ops without an ORT gradient are rewritten by prepare after it has grouped the parameters, so
that e.g. a PRelu slope stays a trainable parameter: ActivationRewritePass)
dynamic spatial input dims -> fixed by --input-shape (the batch dimension stays dynamic)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from .errors import NeqError
from .model_io import default_opset
from .passes.constant_weights import ConstantWeightsPass
from .passes.output_activation import OutputActivationPass

TARGET_OPSET = 17
TARGET_IR = 8


@dataclass
class NormalizeReport:
    opset: tuple[int, int] | None = None  # (from, to) when converted
    lifted_weights: int = 0
    output_activation: dict | None = None
    rewritten: dict[str, int] = field(default_factory=dict)
    input_shape: list[int] | None = None

    def lines(self) -> list[str]:
        out = []
        if self.opset:
            out.append(f"opset      converted {self.opset[0]} -> {self.opset[1]} (IR version {TARGET_IR})")
        if self.lifted_weights:
            out.append(f"weights    {self.lifted_weights} Constant/ConstantOfShape outputs became initializers")
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
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shapes are a convenience here; ORT infers them again
        pass
    return proto


def normalize(model: ir.Model, report: NormalizeReport, input_shape: list[int] | None = None) -> None:
    """The graph passes, in place."""
    _drop_initializer_inputs(model)
    lift = ConstantWeightsPass()
    lift(model)
    report.lifted_weights = len(lift.lifted)
    _drop_unused_initializers(model)
    activation = OutputActivationPass()
    activation(model)
    report.output_activation = activation.removed
    _flatten_logits(model, report)
    if input_shape:
        _fix_input_shape(model, input_shape)
        report.input_shape = input_shape


def _flatten_logits(model: ir.Model, report: NormalizeReport) -> None:
    """Logits [N, K, 1, 1] (a 1x1 Conv head + global pooling) -> Flatten -> [N, K] for the loss."""
    out = model.graph.outputs[0]
    if out.shape is None or out.shape.rank() <= 2 or any(d != 1 for d in out.shape[2:]):
        return
    node = ir.node("Flatten", [out], attributes={"axis": 1}, name="neq.flatten_logits")
    flat = node.outputs[0]
    flat.name, flat.type, flat.shape = out.name + ".flat", out.type, ir.Shape([out.shape[0], out.shape[1]])
    model.graph.append(node)
    model.graph.outputs[0] = flat
    report.rewritten["Flatten (4-D logits)"] = 1


def _drop_initializer_inputs(model: ir.Model) -> None:
    """IR < 4 lists every initializer as a graph input too; they are parameters, not inputs."""
    graph = model.graph
    keep = [v for v in graph.inputs if v.name not in graph.initializers]
    graph.inputs.clear()
    graph.inputs.extend(keep)


def _drop_unused_initializers(model: ir.Model) -> None:
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def _fix_input_shape(model: ir.Model, shape: list[int]) -> None:
    value = model.graph.inputs[0]
    if len(shape) != 4:
        raise NeqError(f"--input-shape takes N,C,H,W (4 numbers), not {shape}")
    value.shape = ir.Shape(["batch", *shape[1:]])
