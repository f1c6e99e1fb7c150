"""ConvGrad(dY, X, W) -> dX, dW, dB in standard ONNX.

dX: ConvTranspose(dY, W) with the forward strides/pads/dilations/group and an output_padding that
    restores X's spatial size (ORT's ConvGrad computes the same col2im sum).
dW: for a regular conv with at least 8x8 output positions, an im2col (one strided Slice of the padded X
    per kernel tap) and a batched MatMul with dY; otherwise
    Conv with the roles swapped (X as input with the batch as channel axis, dY as weight, strides and
    dilations exchanged), transposed and sliced to the kernel size; grouped and depthwise convs keep
    `group` (the batch folds into each group's channels, so nothing depends on the batch size). A
    1x1/stride-1/unpadded conv is a batched MatMul. Which form pays is measured per layer shape
    (`_im2col_pays`).
dB: ReduceSum(dY) over batch and spatial axes.

With `channels` (an int64 value of k output-channel indices, k dynamic; graph/specialize.py) dW and dB
are computed for those channels only, as [k, ...]: dY's channels are gathered first. Regular convs run the
same full-form dW (MatMul, im2col or swapped-roles Conv) on the k gathered channels; depthwise convs also gather X's channels
(channel c reads input channel c // multiplier) and correlate tap by tap (per tap a strided Slice of the
padded X, times dY, summed), since a Conv's `group` cannot follow a dynamic k; other grouped convs compute the full
dW and Gather its rows. dX is always the full ConvTranspose.
"""

from __future__ import annotations

import itertools
import math

from onnx_neq.errors import NeqError
from onnx_neq.graph.lowering.builder import Builder


def conv_geometry(b: Builder, x_spatial: list[int], kernel: list[int]):
    """(strides, dilations, pads_begin, pads_end, out_spatial) of the forward Conv, auto_pad resolved."""
    r = len(kernel)
    strides = list(b.attr("strides") or [1] * r)
    dilations = list(b.attr("dilations") or [1] * r)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    auto_pad = b.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad == "NOTSET":
        pads = list(b.attr("pads") or [0] * (2 * r))
        begin, end = pads[:r], pads[r:]
    elif auto_pad == "VALID":
        begin, end = [0] * r, [0] * r
    else:  # SAME_UPPER / SAME_LOWER
        total = [max((math.ceil(i / s) - 1) * s + e - i, 0) for i, s, e in zip(x_spatial, strides, extent)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    out = [(i + pb + pe - e) // s + 1 for i, pb, pe, e, s in zip(x_spatial, begin, end, extent, strides)]
    return strides, dilations, begin, end, out


def lower_conv_grad(b: Builder, channels: str | None = None) -> None:
    """ConvGrad(dY, X, W) -> ConvTranspose(dY, W), Conv(X^T, dY^T)^T[..k] (or MatMul for 1x1), ReduceSum(dY).

    `channels`: dW and dB for those output channels only (see the module docstring)."""
    dy, x, w = b.input(0), b.input(1), b.input(2)
    w_shape = b.static_dims(w)
    x_spatial = b.static_dims(x, 2)
    kernel = list(b.attr("kernel_shape") or w_shape[2:])
    if len(x_spatial) != len(kernel):
        raise NeqError(f"ConvGrad node {b.node.name!r}: X has {len(x_spatial)} spatial dims but the kernel {kernel}")
    group = b.attr("group", 1)
    strides, dilations, begin, end, out = conv_geometry(b, x_spatial, kernel)
    if b.output(0):
        _dx(b, dy, w, x_spatial, kernel, strides, dilations, begin, end, out, group)
    if channels:
        _selected_grads(b, channels, dy, x, w_shape, kernel, strides, dilations, begin, end, out, group)
        return
    if b.output(1):
        _dw(b, dy, x, w_shape, kernel, strides, dilations, begin, end, out, group)
    if b.output(2):
        axes = [0] + list(range(2, 2 + len(kernel)))
        b.op("ReduceSum", [dy, b.const(axes)], [b.output(2)], keepdims=0)


def _dx(b: Builder, dy, w, x_spatial, kernel, strides, dilations, begin, end, out, group) -> None:
    """dX = ConvTranspose(dY, W) cropped by the forward pads, padded at the end to X's size."""
    full = [s * (o - 1) + (k - 1) * d + 1 - pb - pe for s, o, k, d, pb, pe in zip(strides, out, kernel, dilations, begin, end)]
    output_padding = [i - f for i, f in zip(x_spatial, full)]
    b.op(
        "ConvTranspose",
        [dy, w],
        [b.output(0)],
        strides=strides,
        dilations=dilations,
        pads=begin + end,
        group=group,
        kernel_shape=kernel,
        output_padding=output_padding if any(output_padding) else None,
    )


def _dw(b: Builder, dy, x, w_shape, kernel, strides, dilations, begin, end, out, group, target: str = "") -> None:
    """dW: a MatMul for 1x1/stride-1/unpadded convs; an im2col MatMul for regular convs with many output
    positions; else the correlation of X with dY as one Conv (roles swapped)."""
    target = target or b.output(1)
    if _pointwise(kernel, strides, begin, end):
        _dw_pointwise(b, dy, x, w_shape, group, target)
    elif group == 1 and _im2col_pays(w_shape[1], out):
        _dw_im2col(b, dy, x, w_shape[1], kernel, strides, dilations, begin, end, out, target)
    else:
        _dw_swapped(b, dy, x, w_shape, kernel, strides, dilations, begin, end, out, group, target)


def _pointwise(kernel, strides, begin, end) -> bool:
    return all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(begin + end)


def _dw_pointwise(b: Builder, dy, x, w_shape, group, target) -> None:
    """dW[g, co, ci] = sum_n dY[n, g, co, :] @ X[n, g, ci, :]^T: batched MatMul, ReduceSum over the batch."""
    c_out, c_in_g = w_shape[0], w_shape[1]
    dy_r = b.op("Reshape", [dy, b.const([0, group, c_out // group, -1])])  # [N, G, Cog, L]
    x_r = b.op("Reshape", [x, b.const([0, group, c_in_g, -1])])  # [N, G, Cig, L]
    mm = b.op("MatMul", [dy_r, b.op("Transpose", [x_r], perm=[0, 1, 3, 2])])  # [N, G, Cog, Cig]
    summed = b.op("ReduceSum", [mm, b.const([0])], keepdims=0)
    b.op("Reshape", [summed, b.const(list(w_shape))], [target])


def _im2col_pays(c_in: int, out: list[int]) -> bool:
    """The im2col form's MatMul reduces over the output positions of each image, the swapped-roles Conv over
    all images' positions at once. Measured per layer on stock onnxruntime 1.31, 2 threads, ResNet-18 shapes
    at 128 px: im2col 1.5-4x faster from 8x8 outputs up (batch 8 and 32), 1.7-3.5x slower at 4x4 and for a
    3-channel stem, whose k*k slices of a large input cost more than the product."""
    return math.prod(out) >= 64 and c_in >= 16


def _dw_im2col(b: Builder, dy, x, c_in, kernel, strides, dilations, begin, end, out, target) -> None:
    """dW[co, ci, t] = sum_n sum_l dY[n, co, l] * cols[n, ci, t, l], cols[.., t, :] one strided Slice of the
    padded X per kernel tap t: a batched MatMul [N, Cin*K, L] @ [N, L, Cout], summed over N. dY may hold
    any number of gathered channels (graph/specialize.py): the MatMul's cost follows it."""
    r = len(kernel)
    axes = list(range(2, 2 + r))
    padded = b.op("Pad", [x, b.const([0, 0, *begin, 0, 0, *end])]) if any(begin + end) else x
    cols = []
    for tap in itertools.product(*(range(k) for k in kernel)):
        starts = [t * d for t, d in zip(tap, dilations)]
        ends = [st + s * (o - 1) + 1 for st, s, o in zip(starts, strides, out)]
        tap_slice = b.op("Slice", [padded, b.const(starts), b.const(ends), b.const(axes), b.const(strides)])
        cols.append(b.op("Reshape", [tap_slice, b.const([0, c_in, 1, -1])]))  # [N, Cin, 1, L]
    stacked = b.op("Reshape", [b.op("Concat", cols, axis=2), b.const([0, c_in * len(cols), -1])])  # [N, Cin*K, L]
    dy_t = b.op("Transpose", [b.op("Reshape", [dy, b.const([0, 0, -1])])], perm=[0, 2, 1])  # [N, L, Cout]
    summed = b.op("ReduceSum", [b.op("MatMul", [stacked, dy_t]), b.const([0])], keepdims=0)  # [Cin*K, Cout]
    b.op("Reshape", [b.op("Transpose", [summed], perm=[1, 0]), b.const([-1, c_in, *kernel])], [target])


def _dw_swapped(b: Builder, dy, x, w_shape, kernel, strides, dilations, begin, end, out, group, target) -> None:
    """dW = Slice(Conv(X', dY', group=G, strides=dilations, dilations=strides)^T, kernel): the batch becomes the
    reduced channel axis. X' = X as [Cig, G*N, *spatial], dY' = dY as [C_out, N, *out]; output [Cig, C_out, k' >= k]."""
    r = len(kernel)
    c_out, c_in_g = w_shape[0], w_shape[1]
    spatial_axes = list(range(2, 2 + r))
    x_spatial = b.static_dims(x, 2)
    x_r = b.op("Reshape", [x, b.const([0, group, c_in_g, -1])])  # [N, G, Cig, HW]
    x_t = b.op("Transpose", [x_r], perm=[2, 1, 0, 3])  # [Cig, G, N, HW]
    x_in = b.op("Reshape", [x_t, b.const([c_in_g, -1] + x_spatial)])  # [Cig, G*N, *spatial]
    dy_r = b.op("Reshape", [dy, b.const([0, group, c_out // group, -1])])  # [N, G, Cog, L]
    dy_t = b.op("Transpose", [dy_r], perm=[1, 2, 0, 3])  # [G, Cog, N, L]
    weight = b.op("Reshape", [dy_t, b.const([c_out, -1] + out)])  # [C_out, N, *out]
    conv = b.op("Conv", [x_in, weight], strides=dilations, dilations=strides, pads=begin + end, group=group)
    dw = b.op("Transpose", [conv], perm=[1, 0] + spatial_axes)  # [C_out, Cig, k']
    b.op("Slice", [dw, b.const([0] * r), b.const(kernel), b.const(spatial_axes)], [target])


# -- gradients of selected output channels ----------------------------------------------------


def _selected_grads(b: Builder, channels, dy, x, w_shape, kernel, strides, dilations, begin, end, out, group) -> None:
    """dW [k, Cig, *kernel] and dB [k] of the output channels `channels` (int64 [k])."""
    r = len(kernel)
    c_out, c_in_g = w_shape[0], w_shape[1]
    dy_k = b.op("Gather", [dy, channels], axis=1)  # [N, k, *out]
    if b.output(1):
        if group == 1:
            _dw_selected_regular(b, dy_k, x, c_in_g, kernel, strides, dilations, begin, end, out)
        elif c_in_g == 1:
            _dw_selected_depthwise(b, channels, dy_k, x, c_out // group, kernel, strides, dilations, begin, end, out)
        else:  # grouped: the full dW, then its rows
            full = b.fresh("dW_full")
            _dw(b, dy, x, w_shape, kernel, strides, dilations, begin, end, out, group, target=full)
            b.op("Gather", [full, channels], [b.output(1)], axis=0)
    if b.output(2):
        b.op("ReduceSum", [dy_k, b.const([0] + list(range(2, 2 + r)))], [b.output(2)], keepdims=0)


def _dw_selected_regular(b: Builder, dy_k, x, c_in, kernel, strides, dilations, begin, end, out) -> None:
    """group 1: the MatMul, im2col or swapped-roles Conv of the full-form dW, on k gathered dY channels."""
    r = len(kernel)
    spatial_axes = list(range(2, 2 + r))
    if _pointwise(kernel, strides, begin, end):
        dy_r = b.op("Reshape", [dy_k, b.const([0, 0, -1])])  # [N, k, L]
        x_r = b.op("Transpose", [b.op("Reshape", [x, b.const([0, 0, -1])])], perm=[0, 2, 1])  # [N, L, Cin]
        summed = b.op("ReduceSum", [b.op("MatMul", [dy_r, x_r]), b.const([0])], keepdims=0)  # [k, Cin]
        b.op("Reshape", [summed, b.const([-1, c_in] + [1] * r)], [b.output(1)])
        return
    if _im2col_pays(c_in, out):
        _dw_im2col(b, dy_k, x, c_in, kernel, strides, dilations, begin, end, out, b.output(1))
        return
    swap = [1, 0] + spatial_axes
    x_in = b.op("Transpose", [x], perm=swap)  # [Cin, N, *spatial]
    weight = b.op("Transpose", [dy_k], perm=swap)  # [k, N, *out]
    conv = b.op("Conv", [x_in, weight], strides=dilations, dilations=strides, pads=begin + end)  # [Cin, k, k']
    dw = b.op("Transpose", [conv], perm=swap)
    b.op("Slice", [dw, b.const([0] * r), b.const(kernel), b.const(spatial_axes)], [b.output(1)])


def _dw_selected_depthwise(b: Builder, channels, dy_k, x, multiplier, kernel, strides, dilations, begin, end, out) -> None:
    """dW[c, 0, t] = sum over n and output positions of dY[n, c] * X[n, c // m] at tap t: per tap, one strided
    Slice of the padded, gathered X times dY, reduced to [k] (measured faster than stacking the taps first)."""
    r = len(kernel)
    x_index = channels if multiplier == 1 else b.op("Div", [channels, b.const(multiplier)])
    x_k = b.op("Gather", [x, x_index], axis=1)  # [N, k, *spatial]
    if any(begin + end):
        x_k = b.op("Pad", [x_k, b.const([0, 0] + list(begin) + [0, 0] + list(end))])
    axes = b.const(list(range(2, 2 + r)))
    steps = b.const(list(strides))
    reduce_axes = b.const([0] + list(range(2, 2 + r)))
    last = b.const([1])
    taps = []
    for tap in itertools.product(*(range(k) for k in kernel)):
        starts = [t * d for t, d in zip(tap, dilations)]
        ends = [st + s * (o - 1) + 1 for st, s, o in zip(starts, strides, out)]
        sliced = b.op("Slice", [x_k, b.const(starts), b.const(ends), axes, steps])  # [N, k, *out]
        summed = b.op("ReduceSum", [b.op("Mul", [sliced, dy_k]), reduce_axes], keepdims=0)  # [k]
        taps.append(b.op("Unsqueeze", [summed, last]))
    stacked = b.op("Concat", taps, axis=1) if len(taps) > 1 else taps[0]  # [k, T]
    b.op("Reshape", [stacked, b.const([-1, 1] + list(kernel))], [b.output(1)])
