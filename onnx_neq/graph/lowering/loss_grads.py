"""SoftmaxCrossEntropyLossGrad, as ORT's CPU kernel computes it."""

from __future__ import annotations

from onnx import helper

from onnx_neq.graph.lowering.builder import Builder


def lower_sce_loss_grad(b: Builder) -> None:
    """SoftmaxCrossEntropyLossGrad(dY, log_prob, label[, weight, ignore_index]) ->
    (Exp(log_prob) - OneHot(label)) * w * dY [/ ReduceSum(w) for mean], w = weight[label] * (label != ignore_index)."""
    dy, log_prob, label = b.input(0), b.input(1), b.input(2)
    weight, ignore = b.input(3), b.input(4)
    reduction = b.attr("reduction", "mean")
    dtype = b.elem_type(log_prob)
    if not ignore and "ignore_index" in b.attrs:
        ignore = b.const(b.attr("ignore_index"), dtype=b.np_dtype(label))
    safe_label, valid = label, None
    if ignore:
        ignore = b.op("Cast", [ignore], to=b.elem_type(label))
        valid = b.op("Not", [b.op("Equal", [label, ignore])])
        safe_label = b.op("Where", [valid, label, b.op("Cast", [b.const(0)], to=b.elem_type(label))])
    depth = b.op("Shape", [log_prob], start=1, end=2)
    onehot = b.op("OneHot", [safe_label, depth, b.const([0.0, 1.0], dtype=helper.tensor_dtype_to_np_dtype(dtype))], axis=1)
    w = b.op("Gather", [weight, safe_label], axis=0) if weight else None
    if valid:
        mask = b.op("Cast", [valid], to=dtype)
        w = b.op("Mul", [w, mask]) if w else mask
    factor = b.op("Mul", [w, dy]) if w else dy  # per sample, or the scalar dY
    if reduction == "mean":
        if w:
            total = b.op("ReduceSum", [w], keepdims=0)
            zero = b.scalar(0.0, log_prob)
            total = b.op("Where", [b.op("Equal", [total, zero]), b.scalar(1.0, log_prob), total])
        else:  # N * D1 * ... = Size(label)
            total = b.op("Cast", [b.op("Size", [label])], to=dtype)
        factor = b.op("Div", [factor, total])
    if w or reduction == "none":
        factor = b.op("Unsqueeze", [factor, b.const([1])])
    diff = b.op("Sub", [b.op("Exp", [log_prob]), onehot])
    b.op("Mul", [diff, factor], [b.output(0)])
