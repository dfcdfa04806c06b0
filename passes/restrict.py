"""The ChannelGraph of a model after live removal: what compaction leaves of every space,
edge, group, parameter, binding, branch, read, rewrite and op, renumbered, with nothing
stale (``ChannelGraph.check`` holds on the result).

Example::

    >>> from fxprune.passes import analyze, trace
    >>> cg = analyze(trace(model, (x,)))
    >>> g = cg.prunable_groups[0]
    >>> keep = cg.effective_keep({g.id: np.arange(g.num_units) >= 2}, set())   # two units go
    >>> smaller = restrict(cg, keep, set())
    >>> smaller.groups[g.id].num_units == g.num_units - 2
    True
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx
import numpy as np

from .channel_graph import Branch, ChannelGraph, Group, Param, Space

__all__ = ["restrict"]


def _listed(dims: object) -> list:
    return dims if isinstance(dims, list) else [dims]


def restrict(cg: ChannelGraph, unit_keep: dict[int, np.ndarray], drop: set[int] = frozenset(),
             replaced: dict[str, str] | None = None, gone: set[str] = frozenset()) -> ChannelGraph:
    """The analysis ``cg`` of the model after compaction: the units not in ``unit_keep``
    (a :meth:`ChannelGraph.effective_keep`) sliced out, the branches ``drop`` removed
    (``replaced`` maps each erased add to the node that took its place), and the tensor
    names ``gone`` deleted. Spaces shrink, kept units are renumbered, edges are re-indexed,
    grouped-conv periods follow, and everything inside dropped branches is gone."""
    replaced = replaced or {}
    dead = cg.dead_nodes(drop) | set(replaced)
    alive = cg.live_spaces(dead)
    for add, new in replaced.items():  # an erased add's stream is now the tensor of the node that took its place
        for dims in _listed(cg.node_dims.get(add)):
            for s in dims.values() if isinstance(dims, dict) else ():
                alive.setdefault(s, new)  # (a branch-first add's space was carried by the branch alone)
    for sp in cg.spaces.values():  # and stays with that node at later removals, for the reads of it
        if sp.node not in dead and sp.node in cg.node_dims:
            alive.setdefault(sp.id, sp.node)
    new_pos = {}
    spaces: dict[int, Space] = {}
    for s in cg.spaces.values():
        if s.id not in alive:
            continue
        kept = cg.keep_indices(s.id, unit_keep)
        pos = np.full(s.size, -1, dtype=np.int64)
        pos[kept] = np.arange(len(kept))
        new_pos[s.id] = pos
        spaces[s.id] = replace(s, size=len(kept), node=s.node if s.node not in dead else alive[s.id])
    graph = nx.MultiGraph()
    graph.add_nodes_from(spaces)
    for u, v, d in cg.graph.edges(data=True):
        if u not in spaces or v not in spaces:
            continue
        pairs = d["pairs"]
        if pairs is not None:
            a, b = (u, v) if d["src"] == u else (v, u)
            ia, ib = new_pos[a][pairs[0]], new_pos[b][pairs[1]]
            ok = (ia >= 0) & (ib >= 0)
            pairs = (ia[ok], ib[ok])
        graph.add_edge(u, v, pairs=pairs, src=d["src"])

    groups: dict[int, Group] = {}
    renumber = {gid: np.cumsum(keep) - 1 for gid, keep in unit_keep.items()}  # kept unit -> its new number
    for g in cg.groups.values():
        members = [s for s in g.spaces if s in spaces]
        if not members:
            continue
        keep = unit_keep.get(g.id)
        factors = g.factors
        if g.derived:  # a product group's factor units, renumbered as their groups keep them
            fg, fu = (a if keep is None else a[keep] for a in g.factors)
            fu = fu.copy()
            for f in set(fg.flat) & set(renumber):
                fu[fg == f] = renumber[f][fu[fg == f]]
            factors = (fg, fu)
        if keep is None:
            groups[g.id] = replace(g, spaces=members, unit_index={s: g.unit_index[s] for s in members}, factors=factors)
            continue
        index = {s: renumber[g.id][g.unit_index[s][keep[g.unit_index[s]]]] for s in members}
        groups[g.id] = replace(g, spaces=members, num_units=int(keep.sum()), unit_index=index, factors=factors)

    params: dict[str, Param] = {}
    for p in cg.params.values():
        names = tuple(n for n in p.names if n not in gone)
        if not names:
            continue
        shape = list(p.shape)
        for b in cg.bindings:
            if b.param == p.name and b.space in spaces:
                shape[b.dim] = cg.kept_size(b, unit_keep)
        params[p.name] = replace(p, name=names[0], names=names, shape=tuple(shape),
                                 branches=tuple(i for i in p.branches if i not in drop))
    rename = {old: p.name for old, p in params.items()}
    bindings = [
        replace(b, param=rename[b.param],
                period=int((cg.keep_indices(b.space, unit_keep) < b.period).sum()) if b.period else None)
        for b in cg.bindings if b.param in rename and b.space in spaces
    ]
    branches: dict[int, Branch] = {}
    for br in cg.branches.values():
        if br.id in drop or br.add in dead:
            continue
        branches[br.id] = replace(
            br, out=replaced.get(br.out, br.out), stream=replaced.get(br.stream, br.stream),
            nodes=frozenset(n for n in br.nodes if n not in dead),
            params=tuple(rename[q] for q in br.params if q in rename))
    params = {p.name: p for p in params.values()}
    return replace(
        cg, graph=graph, spaces=spaces, groups=groups, branches=branches, params=params, bindings=bindings,
        reads=[r for r in cg.reads if r.node not in dead and r.space in spaces],
        op_flops=[replace(o, branches=tuple(i for i in o.branches if i not in drop)) for o in cg.op_flops
                  if o.node not in dead and all(s in spaces for s in o.spaces)],
        rewrites=[r for r in cg.rewrites if r.node not in dead and all(s in spaces for s in r.spaces)],
        node_dims={n: d for n, d in cg.node_dims.items() if n not in dead},
    )
