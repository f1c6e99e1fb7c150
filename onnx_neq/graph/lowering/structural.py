"""ORT's training variants of Concat and Split."""

from __future__ import annotations

from onnx_neq.graph.lowering.builder import Builder


def lower_concat_training(b: Builder) -> None:
    """ConcatTraining(x1..xn, axis) -> Concat(x1..xn), Concat(Shape(xi)[axis] ...) as the per-input lengths."""
    axis = b.attr("axis")
    inputs = [i for i in b.node.input if i]
    b.op("Concat", inputs, [b.output(0)], axis=axis)
    if b.output(1):
        end = axis + 1 if axis != -1 else None
        sizes = [b.op("Shape", [i], start=axis, end=end) for i in inputs]
        b.op("Concat", sizes, [b.output(1)], axis=0) if len(sizes) > 1 else b.op("Identity", sizes, [b.output(1)])


def lower_split_training(b: Builder) -> None:
    """SplitTraining(x, split, axis) -> Split(x, split, axis)."""
    outputs = [o or b.fresh("unused") for o in b.node.output]
    b.op("Split", [b.input(0), b.input(1)], outputs, axis=b.attr("axis", 0))
