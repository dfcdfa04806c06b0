"""Dependency analysis pass: a traced ``GraphModule`` -> :class:`ChannelGraph`.

One walk over the fx graph in topological order applies each op's rule
(:mod:`fxprune.passes.op_rules`), building a networkx multigraph of channel spaces whose
edges tie channel indices. Groups are its connected components; units (what one gate
entry removes) are the classes of tied indices inside a group; residual branches are the
``add(x, F(x))`` whose F feeds nothing else.

Example::

    >>> gm = trace(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    >>> cg = analyze(gm)
    >>> len(cg.prunable_groups), len(cg.branches)
    (13, 8)
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from torch import fx

from .channel_graph import Binding, Branch, ChannelGraph, Group, Read, Rewrite, Space
from .op_rules import describe, is_tensor, rule_for, shape, tensor_args
from .trace import LEAVES_META

__all__ = ["analyze", "Builder"]

_SIZE_SINKS = {"view", "reshape"}


class Builder:
    """Mutable state of one analysis walk; rules call its methods."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.leaves: dict[str, str] = gm.meta.get(LEAVES_META, {})
        self.graph = nx.MultiGraph()
        self.spaces: list[Space] = []
        self.bindings: dict[tuple[str, int], Binding] = {}
        self.reads: list[Read] = []
        self.rewrites: list[Rewrite] = []
        self.dims: dict[str, Any] = {}
        self.tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}

    # -- spaces
    def new(self, node: fx.Node, dim: int, size: int, frozen: str | None = None) -> int:
        s = Space(len(self.spaces), node.name, dim, size, frozen)
        self.spaces.append(s)
        self.graph.add_node(s.id)
        return s.id

    def dims_of(self, x: Any) -> dict[int, int]:
        d = self.dims.get(x.name) if isinstance(x, fx.Node) else None
        return d if isinstance(d, dict) and "size_of" not in d else {}

    def space(self, x: fx.Node, dim: int) -> int:
        """The space of ``x`` on ``dim``; created on first use for untracked tensors
        (a parameter becomes a carrier, anything else is frozen)."""
        dims = self.dims.setdefault(x.name, {})
        if dim in dims:
            return dims[dim]
        size = shape(x)[dim]
        if x.op == "get_attr":
            s = self.new(x, dim, size)
            self.bind(x.target, dim, s, "carrier", x.target)
        elif x.op == "placeholder":
            s = self.new(x, dim, size, f"graph input '{x.name}'")
        else:
            s = self.new(x, dim, size, f"channels come from '{x.name}' ({describe(self, x)}), which the analysis does not track")
        dims[dim] = s
        return s

    def link(self, a: int, b: int, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Tie index ``pairs[0][k]`` of space ``a`` to ``pairs[1][k]`` of ``b`` (identity if None)."""
        if pairs is None and self.spaces[a].size != self.spaces[b].size:
            raise AssertionError(f"identity link between spaces of sizes {self.spaces[a].size} and {self.spaces[b].size}")
        self.graph.add_edge(a, b, pairs=pairs, src=a)

    def freeze(self, s: int, reason: str) -> None:
        if self.spaces[s].frozen is None:
            self.spaces[s].frozen = reason

    # -- roles
    def param(self, target: str):
        return self.tensors[target]

    def bind(self, target: str, dim: int, space: int, role: str, owner: str, period: int | None = None) -> None:
        key = (target, dim)
        if key in self.bindings:  # a shared parameter: its users' channels are the same channels
            self.link(self.bindings[key].space, space)
            return
        self.bindings[key] = Binding(target, dim, space, role, owner, period)

    def read(self, node: fx.Node, argpos: int, space: int, dim: int) -> None:
        self.reads.append(Read(node.name, argpos, space, dim))

    def rewrite(self, node: fx.Node, kind: str, pos: int, spaces: tuple[int, ...]) -> None:
        self.rewrites.append(Rewrite(node.name, kind, pos, spaces))

    def check_size_use(self, node: fx.Node, x: Any, d: Any) -> dict:
        """``x.size(d)`` / ``x.shape[d]``: a channel count read as a Python int is only
        safe where it feeds a view/reshape (recomputed after compaction)."""
        if isinstance(x, fx.Node) and isinstance(self.dims.get(x.name), dict) and "size_of" in self.dims[x.name]:
            x = self.dims[x.name]["size_of"]
        if not isinstance(d, int) or not is_tensor(x):
            return {}
        dims = self.dims_of(x)
        d = d + len(shape(x)) if d < 0 else d
        if d in dims:
            bad = [u for u in node.users if not (u.op in ("call_method", "call_function") and getattr(u.target, "__name__", u.target) in _SIZE_SINKS)]
            if bad:
                self.freeze(dims[d], f"the size of channel dim {d} of '{x.name}' is used by '{bad[0].name}'")
        return {}


def _groups(b: Builder) -> list[Group]:
    has_producer = {bd.space for bd in b.bindings.values() if bd.role == "producer"}
    groups = []
    for gid, comp in enumerate(sorted(nx.connected_components(b.graph), key=min)):
        members = sorted(comp)
        edges = list(b.graph.subgraph(members).edges(data=True))
        if all(d["pairs"] is None for _, _, d in edges):
            n = b.spaces[members[0]].size
            unit_index = {s: np.arange(n) for s in members}
        else:
            off, total = {}, 0
            for s in members:
                off[s], total = total, total + b.spaces[s].size
            rows, cols = [], []
            for u, v, d in edges:
                u, v = (u, v) if d["src"] == u else (v, u)  # undirected: orient the pairs
                iu, iv = (np.arange(b.spaces[u].size),) * 2 if d["pairs"] is None else d["pairs"]
                rows.append(off[u] + np.asarray(iu)), cols.append(off[v] + np.asarray(iv))
            rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
            adj = sp.coo_matrix((np.ones(len(rows_a), dtype=np.int32), (rows_a, cols_a)), shape=(total, total))
            n, labels = connected_components(adj, directed=False)
            _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
            rank = np.empty(n, dtype=np.int64)
            rank[np.argsort(first)] = np.arange(n)
            units = rank[inv]
            unit_index = {s: units[off[s]:off[s] + b.spaces[s].size] for s in members}
        frozen = list(dict.fromkeys(b.spaces[s].frozen for s in members if b.spaces[s].frozen))
        if not frozen and not has_producer & set(members):
            frozen = [f"no layer produces these channels (first seen at '{b.spaces[members[0]].node}')"]
        for s in members:
            b.spaces[s].group = gid
        groups.append(Group(gid, members, n, unit_index, frozen))
    return groups


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


def _branches(gm: fx.GraphModule) -> list[Branch]:
    """Residual branches ``s + F(x)``: F reads one tensor x (and parameters) and feeds only
    the add; ``s`` is x itself or a shortcut that reads only x (a projection). Removing F
    leaves ``s``."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for add in gm.graph.nodes:
        if not (add.op == "call_function" and getattr(add.target, "__name__", "") in ("add", "iadd")) or add.kwargs:
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
            out.append(Branch(len(out), add.name, stream.name, branch.name, frozenset(n.name for n in cone)))
    return out


def analyze(gm: fx.GraphModule) -> ChannelGraph:
    """Find the channel groups, their roles and the residual branches of a traced model.

    ``gm`` must come from :func:`fxprune.trace` (shapes in ``node.meta``).
    """
    nodes = list(gm.graph.nodes)
    if any("tensor_meta" not in n.meta for n in nodes if n.op == "placeholder"):
        raise ValueError("analyze needs shapes in node.meta: trace the model with fxprune.trace(model, example_inputs)")
    b = Builder(gm)
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            for t in tensor_args(node):
                for s in b.dims_of(t).values():
                    b.freeze(s, f"model output '{t.name}'")
            continue
        b.dims[node.name] = rule_for(b, node)(b, node)
    groups = _groups(b)
    return ChannelGraph(
        graph=b.graph, spaces=b.spaces, groups=groups, branches=_branches(gm), bindings=list(b.bindings.values()),
        reads=b.reads, rewrites=b.rewrites, node_dims=b.dims, leaves=dict(b.leaves),
    )
