"""Residual branches ``s + F(x)``: F reads one tensor x (and parameters) and feeds only
the add; ``s`` is x itself or a shortcut that reads only x (a projection). Removing F
leaves ``s``."""

from __future__ import annotations

from torch import fx

from ..op_classes import ADD_FUNCTIONS
from .generic import is_tensor, shape

__all__ = ["find_branches"]


def _cone(order: dict[fx.Node, int], out: fx.Node, add: fx.Node) -> set[fx.Node] | None:
    """Nodes feeding ``out`` and nothing outside (``out`` included), or None if ``out`` escapes."""
    if set(out.users) != {add}:
        return None
    members, pending = {out}, sorted(out.all_input_nodes, key=order.get)
    while pending:
        n = pending.pop()
        if n in members or n.op in ("placeholder", "output"):
            continue
        if all(u in members for u in n.users):
            members.add(n)
            pending.extend(n.all_input_nodes)
            pending.sort(key=order.get)
    return members


def _external(cone: set[fx.Node]) -> set[fx.Node]:
    return {i for n in cone for i in n.all_input_nodes if i not in cone and i.op != "get_attr"}


def find_branches(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node, set[fx.Node]]]:
    """``(add, stream, out, nodes of F)`` for every residual branch, in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for add in gm.graph.nodes:
        if not (add.op == "call_function" and add.target in ADD_FUNCTIONS) or add.kwargs:
            continue
        ops = add.args[:2]
        if len(add.args) != 2 or not all(is_tensor(a) for a in ops) or not shape(ops[0]) == shape(ops[1]) == shape(add):
            continue
        candidates = []
        for stream, branch in (ops, ops[::-1]):
            cone = _cone(order, branch, add)
            if not cone or stream in cone:
                continue
            external = _external(cone)
            if len(external) != 1 or not any(n.op in ("call_module", "call_function", "call_method") for n in cone):
                continue
            shortcut = _cone(order, stream, add) if stream not in external else None
            if stream in external or (shortcut and _external(shortcut) == external):
                candidates.append((len(cone), stream, branch, cone))
        if candidates:  # both sides qualify with a projection shortcut: the branch is the larger side
            _, stream, branch, cone = max(candidates, key=lambda c: c[0])
            out.append((add, stream, branch, cone))
    return out
