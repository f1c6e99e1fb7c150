"""MaxPoolGrad and AveragePoolGrad (ORT's default-domain gradient ops, not in the ONNX standard)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.graph.lowering.builder import Builder
from onnx_neq.graph.lowering.conv_grad import conv_geometry


def lower_max_pool_grad(b: Builder) -> None:
    """MaxPoolGrad(dY, Indices) -> Reshape(ScatterElements(zeros[Size(X)], Indices, dY, add), Shape(X)),
    X being the input of the MaxPool that produced Indices (flat indices over the whole tensor)."""
    dy, indices = b.input(0), b.input(1)
    pool = b.producer(indices)
    if pool is None or pool.op_type != "MaxPool":
        raise NeqError(f"MaxPoolGrad node {b.node.name!r}: its indices {indices!r} do not come from a MaxPool node")
    x = pool.input[0]
    flat = b.const([-1])
    zeros = b.op(
        "ConstantOfShape",
        [b.op("Reshape", [b.op("Size", [x]), b.const([1])])],
        value=_zero(b.elem_type(dy)),
    )
    scattered = b.op(
        "ScatterElements",
        [zeros, b.op("Reshape", [indices, flat]), b.op("Reshape", [dy, flat])],
        axis=0,
        reduction="add",
    )
    b.op("Reshape", [scattered, b.op("Shape", [x])], [b.output(0)])


def _zero(elem_type: int):
    from onnx import helper

    return helper.make_tensor("zero", elem_type, [1], [0])


def lower_average_pool_grad(b: Builder) -> None:
    """AveragePoolGrad(dY) -> ConvTranspose(Reshape(dY * 1/count, [-1, 1, *out]), ones[k]) reshaped to X's shape.

    count per output position is prod(kernel) with count_include_pad, else the window clipped to X (as ORT's kernel);
    X's spatial shape comes from the gradient output's static shape."""
    dy, dx = b.input(0), b.output(0)
    x_spatial = b.static_dims(dx, 2)
    kernel = list(b.attr("kernel_shape"))
    strides, dilations, begin, end, out = conv_geometry(b, x_spatial, kernel)
    if any(d != 1 for d in dilations):
        raise NeqError(f"AveragePoolGrad node {b.node.name!r}: dilations {dilations} are not supported")
    full = [s * (o - 1) + k - pb - pe for s, o, k, pb, pe in zip(strides, out, kernel, begin, end)]
    output_padding = [i - f for i, f in zip(x_spatial, full)]
    if any(p < 0 for p in output_padding):
        raise NeqError(f"AveragePoolGrad node {b.node.name!r}: windows reach past the padded input (ceil_mode); not supported")
    scale = inverse_counts(b.attr("count_include_pad", 0), kernel, strides, begin, x_spatial, out).astype(b.np_dtype(dy))
    dy_r = b.op("Reshape", [dy, b.const([-1, 1] + out)])
    if np.all(scale == scale.flat[0]):
        weight = np.full([1, 1] + kernel, scale.flat[0], dtype=scale.dtype)
    else:
        dy_r = b.op("Mul", [dy_r, b.const(scale.reshape([1, 1] + out))])
        weight = np.ones([1, 1] + kernel, dtype=scale.dtype)
    dx_r = b.op(
        "ConvTranspose",
        [dy_r, b.const(weight)],
        strides=strides,
        pads=begin + end,
        kernel_shape=kernel,
        output_padding=output_padding if any(output_padding) else None,
    )
    batch_channels = b.op("Slice", [b.op("Shape", [dy]), b.const([0]), b.const([2])])
    target = b.op("Concat", [batch_channels, b.const(x_spatial)], axis=0)
    b.op("Reshape", [dx_r, target], [dx])


def inverse_counts(include_pad, kernel, strides, begin, x_spatial, out) -> np.ndarray:
    """1/count for each output position, as ONNX's AveragePool and ORT's AveragePoolGrad count a window."""
    scale = np.empty(out, dtype=np.float64)
    for pos in itertools.product(*(range(o) for o in out)):
        if include_pad:
            count = math.prod(kernel)
        else:
            count = 1
            for p, s, pb, k, size in zip(pos, strides, begin, kernel, x_spatial):
                lo, hi = max(p * s - pb, 0), min(p * s - pb + k, size)
                count *= hi - lo
        scale[pos] = 1.0 / count
    return scale
