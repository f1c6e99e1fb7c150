"""What a gradient rule works with: one forward node, the gradients of its outputs, and an emitter.

A rule reads `dy(i)` (the gradient of output i, or None when nothing downstream needs it), asks
`needs(i)` for each input, and hands the gradient of input i to `set_grad(i, value)`. It emits standard
ONNX through `op`/`const` (the lowering's Builder, whose node is the forward node renamed
`<node>_Grad`), or through `lowered(...)`: an ORT gradient op built as a NodeProto and turned into
standard ONNX at once by the lowering rule of the same name, so the two paths share one form.
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnx_neq.errors import NeqError
from onnx_neq.graph.lowering.builder import Builder, Dim
from onnx_neq.graph.lowering.rules import RULES as LOWERING_RULES

MS = "com.microsoft"


class GradContext(Builder):
    def __init__(self, node: onnx.NodeProto, dys: list[str | None], needs: list[bool], shapes, producers, names, constants):
        grad_node = onnx.NodeProto()
        grad_node.CopyFrom(node)
        grad_node.name = f"{node.name}_Grad"
        super().__init__(grad_node, shapes, producers, names)
        self.forward = node
        self._dys, self._needs, self._constants = dys, needs, constants
        self.grads: dict[int, str] = {}
        self.saved: dict[str, tuple[str, str]] = {}  # training-mode BatchNorm node -> (batch mean, inverse std)

    # -- the forward node ------------------------------------------------------------------
    def x(self, i: int) -> str:
        """The forward node's i-th input ('' when absent)."""
        return self.forward.input[i] if i < len(self.forward.input) else ""

    def y(self, i: int) -> str:
        return self.forward.output[i] if i < len(self.forward.output) else ""

    def dy(self, i: int = 0) -> str | None:
        return self._dys[i] if i < len(self._dys) else None

    def needs(self, i: int) -> bool:
        return i < len(self._needs) and self._needs[i]

    def set_grad(self, i: int, value: str) -> None:
        """The gradient of input i: one contribution; the builder sums a value's contributions."""
        self.grads[i] = value

    # -- emitting ----------------------------------------------------------------------------
    def lowered(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = MS, name: str | None = None, **attrs) -> None:
        """Emit ORT's gradient op `op_type` through the lowering rule of that op (standard ONNX only).
        Outputs given as '' are not computed; attributes default to the forward node's."""
        node = helper.make_node(op_type, inputs, outputs, name=name or self.fresh(op_type), domain=domain)
        node.attribute.extend(a for a in self.forward.attribute if a.name not in attrs)
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items() if v is not None)
        inner = Builder(node, self._shapes, self._producers, self._names)
        LOWERING_RULES[(domain if domain != "ai.onnx" else "", op_type)](inner)
        self.nodes.extend(inner.nodes)
        self.initializers.extend(inner.initializers)

    def fresh_like(self, hint: str, like: str) -> str:
        """A new value name whose type and shape are those of `like` (for lowering rules that read shapes)."""
        name = self.fresh(hint)
        self.note_shape(name, like)
        return name

    def note_shape(self, name: str, like: str) -> None:
        if like in self._shapes:
            self._shapes[name] = self._shapes[like]

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def static_shape(self, name: str) -> list[int] | None:
        info = self._shapes.get(name)
        dims = info[1] if info else None
        return dims if dims is not None and all(isinstance(d, int) for d in dims) else None

    def constant_ints(self, name: str) -> list[int] | None:
        """The int values of an initializer or Constant-node output `name`, else None."""
        return self._constants.get(name) if name else None

    def fail(self, why: str) -> NeqError:
        return NeqError(f"{self.forward.op_type} node {self.forward.name!r}: {why}")


def dims_equal(a: Dim, b: Dim) -> bool:
    return a is not None and a == b
