"""Two moves every rewriting pass makes after emitting its nodes and constants on an `ir.tape.Tape`:
put what the tape holds into the graph, and hand a replaced node's output over to a new value."""

from __future__ import annotations

import onnx_ir as ir


def splice(graph: ir.Graph, tape: ir.tape.Tape, *, before: ir.Node | None = None, after: ir.Node | None = None) -> None:
    """The tape's nodes, in the order it recorded them, before or after a node of `graph`; its initializers registered."""
    for value in tape.initializers:
        graph.register_initializer(value)
    if before is not None:
        graph.insert_before(before, tape.nodes)
    else:
        graph.insert_after(after, tape.nodes)


def take_over(old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` everywhere (graph outputs too) under old's name, type and shape."""
    name, old.name = old.name, f"{old.name}.replaced"
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    new.name, new.type, new.shape = name, new.type or old.type, new.shape or old.shape
