"""What a lowering rule works with: the node's attributes, static shapes, and an emitter of standard nodes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_neq.errors import NeqError

Dim = int | str | None  # a static size, a symbolic name, or unknown


class Builder:
    """Emits the standard-ONNX nodes and initializers that replace one node.

    `op` returns the new value name(s); a rule passes `outputs=` to write the node's own outputs.
    """

    def __init__(self, node: onnx.NodeProto, shapes: dict[str, tuple[int, list[Dim] | None]], producers: dict, names):
        self.node = node
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self._shapes, self._producers, self._names = shapes, producers, names
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    # -- names and attributes -------------------------------------------------------------
    def attr(self, name: str, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def input(self, i: int) -> str:
        """The node's i-th input name, or '' when absent."""
        return self.node.input[i] if i < len(self.node.input) else ""

    def output(self, i: int) -> str:
        """The node's i-th output name, or '' when absent (the rule then need not compute it)."""
        return self.node.output[i] if i < len(self.node.output) else ""

    def fresh(self, hint: str) -> str:
        return self._names(f"{self.node.name or self.node.op_type}/{hint}")

    # -- emitting ---------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs):
        """Append `op_type(inputs)`; returns its output name (one output) or list of names."""
        outs = [self.fresh(op_type) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A new initializer holding `value` (a list or array; lists become `dtype`)."""
        array = np.asarray(value, dtype=dtype if not isinstance(value, np.ndarray) else value.dtype)
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def scalar(self, value: float, like: str) -> str:
        """A 0-d constant with the element type of value `like`."""
        return self.const(np.array(value, dtype=self.np_dtype(like)))

    # -- static information -----------------------------------------------------------------
    def elem_type(self, name: str) -> int:
        info = self._shapes.get(name)
        return info[0] if info else onnx.TensorProto.FLOAT

    def np_dtype(self, name: str):
        return helper.tensor_dtype_to_np_dtype(self.elem_type(name))

    def shape(self, name: str) -> list[Dim]:
        """The static shape of `name` (dims may be symbolic or None); NeqError if even the rank is unknown."""
        info = self._shapes.get(name)
        if info is None or info[1] is None:
            raise NeqError(f"{self.node.op_type} node {self.node.name!r}: the shape of {name!r} is unknown, so it cannot be lowered")
        return info[1]

    def static_dims(self, name: str, start: int = 0) -> list[int]:
        """`shape(name)[start:]` as ints; NeqError when any of them is not static."""
        dims = self.shape(name)[start:]
        if not all(isinstance(d, int) for d in dims):
            raise NeqError(
                f"{self.node.op_type} node {self.node.name!r}: {name!r} has dims {dims} from axis {start}, which must be static to lower it"
            )
        return dims  # type: ignore[return-value]

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producers.get(name)
