"""Groups and units from the links between spaces: connected components of the
networkx graph, and inside each the classes of tied channel indices (scipy)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ..channel_graph import Group, Rewrite, Space

#: (size space, reshaped space, reshape node, the rewrite that makes it right when the two differ, or None)
Tie = tuple[int, int, str, Rewrite | None]

__all__ = ["find_groups", "resolve_ties", "resolve_products"]


def find_groups(graph: nx.MultiGraph, spaces: list[Space], producers: set[int]) -> dict[int, Group]:
    """One group per connected component of ``graph`` (numbered by their first space),
    its units the classes of tied indices; ``spaces[s].group`` is set. A group no layer
    produces is frozen."""
    groups: dict[int, Group] = {}
    components = sorted(nx.connected_components(graph), key=min)
    component_of = {s: gid for gid, comp in enumerate(components) for s in comp}
    edges_of: list[list] = [[] for _ in components]
    for u, v, d in graph.edges(data=True):
        edges_of[component_of[u]].append((u, v, d))
    for gid, comp in enumerate(components):
        members = sorted(comp)
        edges = edges_of[gid]
        if all(d["pairs"] is None for _, _, d in edges):
            n = spaces[members[0]].size
            unit_index = {s: np.arange(n) for s in members}
        else:
            off, total = {}, 0
            for s in members:
                off[s], total = total, total + spaces[s].size
            rows, cols = [], []
            for u, v, d in edges:
                u, v = (u, v) if d["src"] == u else (v, u)  # undirected: orient the pairs
                iu, iv = (np.arange(spaces[u].size),) * 2 if d["pairs"] is None else d["pairs"]
                rows.append(off[u] + np.asarray(iu))
                cols.append(off[v] + np.asarray(iv))
            rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
            adj = sp.coo_matrix((np.ones(len(rows_a), dtype=np.int32), (rows_a, cols_a)), shape=(total, total))
            n, labels = connected_components(adj, directed=False)
            _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
            rank = np.empty(n, dtype=np.int64)
            rank[np.argsort(first)] = np.arange(n)
            units = rank[inv]
            unit_index = {s: units[off[s]:off[s] + spaces[s].size] for s in members}
        frozen = list(dict.fromkeys(spaces[s].frozen for s in members if spaces[s].frozen))
        if not frozen and not producers & set(members):
            frozen = [f"no layer produces these channels (first seen at '{spaces[members[0]].node}')"]
        for s in members:
            spaces[s].group = gid
        groups[gid] = Group(gid, members, n, unit_index, frozen)
    return groups


def resolve_ties(groups: dict[int, Group], spaces: list[Space], ties: list[Tie]) -> list[Rewrite]:
    """A reshape given a channel count read from a tensor's shape (``B, N, C = x.shape;
    y.reshape(B, N, C)``) stays right after compaction if ``C`` and the reshaped dim keep
    the same channels: the same group and the same units. Otherwise the count is written
    in as the reshaped dim's own kept size, where the tie says how (its ``fix``: the
    rewrites returned), or both groups are frozen, naming the reshape."""
    fixes: list[Rewrite] = []
    for size_space, out_space, node, fix in ties:
        ga, gb = groups[spaces[size_space].group], groups[spaces[out_space].group]
        if ga is gb and np.array_equal(ga.unit_index[size_space], gb.unit_index[out_space]):
            continue
        if fix is not None:
            fixes.append(fix)
            continue
        why = (f"'{node}' reshapes with the channel count of '{spaces[size_space].node}' (dim {spaces[size_space].dim}), "
               f"which is not the reshaped tensor's own")
        for g in (ga, gb):
            if why not in g.frozen:
                g.frozen.append(why)
    return fixes


def _produced(graph: nx.MultiGraph, factorizations: list, producers: set[int]) -> set[int]:
    """The spaces some layer produces through ties or products: a product's factors are
    produced by the layer that produces the product (the heads and head_dim of ``q_proj``'s
    output), and a product of produced factors is produced (the merged attention output)."""
    joined = nx.Graph(graph)
    for f in factorizations:
        joined.add_edges_from((f.space, p) for p in f.parts)
    return {s for comp in nx.connected_components(joined) if producers & comp for s in comp}


def _why_not(f, groups: dict[int, Group], spaces: list[Space], products: dict[int, list], factor_groups: set[int]) -> str | None:
    """Why factorization ``f`` cannot be pruned as a product (None: it can)."""
    g = groups[spaces[f.space].group]
    parts = [groups[spaces[p].group] for p in f.parts]
    if g.frozen:
        return g.frozen[0]
    for h in parts:
        if h.frozen:
            return h.frozen[0]
        if h is g or h.id in products:
            return "its factors are tied to each other or to the product"
    if len({h.id for h in parts}) < len(parts):
        return "two of its factors are one channel group"
    if g.id in factor_groups:
        return "the product is itself the factor of another product"
    return None


def resolve_products(graph: nx.MultiGraph, spaces: list[Space], producers: set[int], ties: list[Tie],
                     factorizations: list, freeze) -> tuple[dict[int, Group], list[Rewrite]]:
    """Groups, with the channel dims viewed as products of dims (``[..., H * D] -> [..., H,
    D]`` and back) made product groups: no gate of their own, a unit kept when its head and
    its head_dim are. A product that cannot be pruned as one (a frozen factor, units whose
    factors disagree) falls back to what a plain view is: the product tied to its outer
    factor in blocks, the factor only the view made (head_dim) frozen (``freeze(space,
    why)``); the groups are then found again. Also returns the rewrites of :func:`resolve_ties`."""
    produced = _produced(graph, factorizations, producers)
    active = list(factorizations)
    while True:
        groups = find_groups(graph, spaces, produced)
        fixes = resolve_ties(groups, spaces, ties)
        products: dict[int, list] = {}
        for f in active:
            products.setdefault(spaces[f.space].group, []).append(f)
        factor_groups = {spaces[p].group for f in active for p in f.parts}
        bad = {id(f): why for f in active if (why := _why_not(f, groups, spaces, products, factor_groups))}
        for gid, fs in products.items():
            if any(id(f) in bad for f in fs):
                continue
            why = _assign_factors(groups[gid], fs, groups, spaces)
            if why:
                bad.update({id(f): why for f in fs})
        if not bad:
            return groups, fixes
        for f in [f for f in active if id(f) in bad]:
            _fall_back(graph, spaces, f, bad[id(f)], freeze)
            active.remove(f)


def _assign_factors(g: Group, fs: list, groups: dict[int, Group], spaces: list[Space]) -> str | None:
    """Set ``g.factors`` from its factorizations, or say why the units' factors disagree."""
    k = len(fs[0].parts)
    fg = np.full((g.num_units, k), -1, dtype=np.int64)
    fu = np.full((g.num_units, k), -1, dtype=np.int64)
    for f in fs:
        if len(f.parts) != k:
            return "it is viewed as products of different numbers of dims"
        units = g.unit_index[f.space]
        for i, (p, m) in enumerate(zip(f.parts, f.maps)):
            h = groups[spaces[p].group]
            want_g, want_u = np.full(len(units), h.id), h.unit_index[p][m]
            before = fg[units, i].copy(), fu[units, i].copy()
            fg[units, i], fu[units, i] = want_g, want_u  # a unit several channels share keeps the last one's
            clash = [(b >= 0) & (b != w) for b, w in zip(before, (want_g, want_u))]
            if clash[0].any() or clash[1].any() or (fg[units, i] != want_g).any() or (fu[units, i] != want_u).any():
                return "its channels are tied to different heads or head_dim entries"
    if (fg < 0).any():
        return "some of its channels are not in the product"
    g.factors = (fg, fu)
    return None


def _fall_back(graph: nx.MultiGraph, spaces: list[Space], f, why: str, freeze) -> None:
    """Factorization ``f`` as a plain view: the inner factors (head_dim) frozen, the product
    tied in blocks to its one outer factor (heads), or everything frozen if it has several."""
    outer = [(p, m) for p, m in zip(f.parts, f.maps) if p not in f.inner]
    for p in f.parts:
        if p in f.inner:
            freeze(p, f"'{f.node}' views channels into ({', '.join(str(spaces[q].size) for q in f.parts)}): "
                      f"this dim is not pruned ({why})")
    if len(outer) == 1:
        p, m = outer[0]
        graph.add_edge(f.space, p, pairs=(np.arange(spaces[f.space].size), m), src=f.space)
        return
    for p, _ in outer:
        freeze(p, f"'{f.node}' splits or interleaves channel dims ({why})")
    freeze(f.space, f"'{f.node}' splits or interleaves channel dims ({why})")
