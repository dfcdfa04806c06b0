"""Groups and units from the links between spaces: connected components of the
networkx graph, and inside each the classes of tied channel indices (scipy)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ..channel_graph import Group, Space

__all__ = ["find_groups", "resolve_ties"]


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
                rows.append(off[u] + np.asarray(iu)), cols.append(off[v] + np.asarray(iv))
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


def resolve_ties(groups: dict[int, Group], spaces: list[Space], ties: list[tuple[int, int, str]]) -> None:
    """A reshape given a channel count read from a tensor's shape (``B, N, C = x.shape;
    y.reshape(B, N, C)``) stays right after compaction only if ``C`` and the reshaped
    dim keep the same channels: the same group and the same units. Otherwise both
    groups are frozen, naming the reshape."""
    for size_space, out_space, node in ties:
        ga, gb = groups[spaces[size_space].group], groups[spaces[out_space].group]
        if ga is gb and np.array_equal(ga.unit_index[size_space], gb.unit_index[out_space]):
            continue
        why = (f"'{node}' reshapes with the channel count of '{spaces[size_space].node}' (dim {spaces[size_space].dim}), "
               f"which is not the reshaped tensor's own")
        for g in (ga, gb):
            if why not in g.frozen:
                g.frozen.append(why)
