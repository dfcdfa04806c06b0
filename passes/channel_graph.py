"""The one contract the passes and the method share: channel spaces, their groups,
parameters by identity, residual branches, reads and shape constants.

A *channel space* is one tensor dimension of one fx node's output that carries channels
(``conv`` output dim 1, ``linear`` output last dim, ...). The analysis links spaces whose
indices are tied (an element-wise add ties its operands index by index; ``cat`` ties each
input to a slice of the output; ``flatten`` ties a channel to each of its features). The
links form a networkx multigraph; a *group* is one connected component, and its *units*
are the classes of channel indices tied together inside it: one unit is what one gate
entry removes.

Everything downstream (gate insertion, the complexity cost, compaction, live removal,
tables and pictures) reads this object and never re-derives channel relations from the
fx graph. After live removal, :func:`passes.restrict.restrict` gives the analysis of the
smaller model, with no stale space, edge, read, rewrite, branch or parameter.

Example::

    >>> from fxprune.passes import analyze, trace
    >>> cg = analyze(trace(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),)))
    >>> g = cg.prunable_groups[0]
    >>> [cg.params[b.param].names for b in cg.bindings_of(g)][:3]
    [('conv1.weight',), ('bn1.weight',), ('bn1.bias',)]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .records import Binding, Branch, Group, OpFlops, Param, Read, Rewrite, Space

__all__ = ["Space", "Param", "Binding", "Read", "Rewrite", "Group", "Branch", "OpFlops", "ChannelGraph"]


@dataclass
class ChannelGraph:
    """Result of :func:`fxprune.passes.analysis.analyze`.

    ``spaces``, ``groups`` and ``branches`` are keyed by id; ids stay the same through
    :meth:`restrict`. ``params`` is keyed by canonical name and ``aliases`` maps every
    name a tensor is reached under to it. ``batch_size`` is the number of examples of
    the input the model was analysed with, ``inputs`` the batch dim of every input
    (placeholder name -> dim, or None), ``all_channels`` the output channels of every
    convolution and linear layer of the model, understood or not (inside leaves, with
    computed weights), ``layer_outputs`` the output space of every conv and linear call
    the analysis understood, ``depthwise`` the convolutions it analysed as depthwise (their
    ``groups`` shrinks with their input channels; a grouped one keeps its ``groups``),
    ``op_flops`` the FLOPs of ops without weights that pruning shrinks (matmuls of
    activations: attention products)."""

    @property
    def batch_input(self) -> str | None:
        """The first input with a batch dim (the gates take the batch size from it)."""
        return next((name for name, d in self.inputs.items() if d is not None), None)

    graph: nx.MultiGraph
    spaces: dict[int, Space]
    groups: dict[int, Group]
    branches: dict[int, Branch]
    params: dict[str, Param]
    bindings: list[Binding]
    reads: list[Read]
    rewrites: list[Rewrite]
    node_dims: dict[str, object]
    batch_size: int = 1
    inputs: dict[str, int | None] = field(default_factory=dict)
    all_channels: int = 0
    layer_outputs: list[tuple[str, int]] = field(default_factory=list)
    depthwise: set[str] = field(default_factory=set)
    leaves: dict[str, str] = field(default_factory=dict)
    op_flops: list[OpFlops] = field(default_factory=list)

    # ------------------------------------------------------------------ queries
    @property
    def aliases(self) -> dict[str, str]:
        return {n: p.name for p in self.params.values() for n in p.names}

    def group_of(self, space: int) -> Group:
        return self.groups[self.spaces[space].group]

    @property
    def prunable_groups(self) -> list[Group]:
        """The groups with a gate of their own (product groups follow their factors)."""
        return [g for g in self.groups.values() if g.prunable and not g.derived]

    def product_keep(self, group: Group, unit_keep: dict[int, np.ndarray]) -> np.ndarray | None:
        """The units a product group keeps when its factor groups keep ``unit_keep`` (None:
        every unit)."""
        fg, fu = group.factors
        keep = np.ones(group.num_units, dtype=bool)
        for g in np.unique(fg):
            if int(g) in unit_keep:
                at = fg == g
                keep &= ~np.any(at & ~unit_keep[int(g)][np.where(at, fu, 0)], axis=1)
        return None if keep.all() else keep

    def complete_keep(self, unit_keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """``unit_keep`` (per gated group) with the units every product group keeps added."""
        out = dict(unit_keep)
        for g in self.groups.values():
            if g.derived and (keep := self.product_keep(g, unit_keep)) is not None:
                out[g.id] = keep
        return out

    def head_shape(self, layer: str) -> tuple[int, int] | None:
        """``(heads, head_dim)`` of ``layer``'s output where it is viewed into heads and
        pruned as their product (a packed q/k/v projection counts its heads once); None
        for any other layer."""
        for owner, s in self.layer_outputs:
            g = self.group_of(s) if owner == layer and s in self.spaces else None
            if g is not None and g.derived:
                units = g.unit_index[s]
                heads, head_dim = (len({(int(a), int(b)) for a, b in zip(g.factors[0][units, i], g.factors[1][units, i])})
                                   for i in range(2))
                return heads, head_dim
        return None

    def bindings_of(self, group: Group) -> list[Binding]:
        members = set(group.spaces)
        return [b for b in self.bindings if b.space in members]

    def keep_indices(self, space: int, unit_keep: dict[int, np.ndarray]) -> np.ndarray:
        """Indices of ``space`` kept when group ``g`` keeps the units ``unit_keep[g]``
        (a bool array); groups absent from ``unit_keep`` keep everything."""
        s = self.spaces[space]
        keep = unit_keep.get(s.group)
        if keep is None and self.groups[s.group].derived:
            keep = self.product_keep(self.groups[s.group], unit_keep)
        if keep is None:
            return np.arange(s.size)
        return np.flatnonzero(keep[self.groups[s.group].unit_index[space]])

    def kept_size(self, b: Binding, unit_keep: dict[int, np.ndarray]) -> int:
        """The size of ``b``'s parameter dimension once ``unit_keep`` is applied."""
        idx = self.keep_indices(b.space, unit_keep)
        return int((idx < b.period).sum()) if b.period else len(idx)

    def dead_nodes(self, drop: set[int]) -> set[str]:
        """The nodes of the branches ``drop`` (what removing them deletes)."""
        return set().union(*(self.branches[i].nodes for i in drop)) if drop else set()

    def live_spaces(self, dead: set[str]) -> dict[int, str]:
        """The spaces some node outside ``dead`` carries, each with the first such node. (A
        space outlives the node that created it: the stream after a residual add is
        carried by the space of the branch's last layer.)"""
        out: dict[int, str] = {}
        for node, dims in self.node_dims.items():
            if node in dead:
                continue
            for d in dims if isinstance(dims, list) else [dims]:
                if isinstance(d, dict):
                    for s in d.values():
                        out.setdefault(s, node)
        return out

    def effective_keep(self, unit_keep: dict[int, np.ndarray], drop: set[int]) -> dict[int, np.ndarray]:
        """``unit_keep`` for the groups that survive dropping the branches ``drop``, with
        the units that have channels only inside dropped branches removed as well."""
        carried = self.live_spaces(self.dead_nodes(drop))
        out: dict[int, np.ndarray] = {}
        for g in sorted(self.groups.values(), key=lambda g: g.derived):  # factors first, then their products
            live = [s for s in g.spaces if s in carried]
            if not live:
                continue
            keep = unit_keep.get(g.id, np.ones(g.num_units, dtype=bool)).copy()
            if g.derived and (by_factors := self.product_keep(g, out)) is not None:
                keep &= by_factors
            alive = np.zeros(g.num_units, dtype=bool)
            for s in live:
                alive[g.unit_index[s]] = True
            keep &= alive
            if not keep.all():
                out[g.id] = keep
        return out

    def check(self) -> None:
        """Raise ``AssertionError`` naming the first inconsistency: a space outside its
        group, a unit index of the wrong size, an edge to a missing space, a binding whose
        parameter dimension differs from its space, a read or branch of a missing node."""
        for s in self.spaces.values():
            g = self.groups.get(s.group)
            assert g is not None and s.id in g.spaces, f"space {s.id} ('{s.node}' dim {s.dim}) is not in its group {s.group}"
            idx = g.unit_index[s.id]
            assert len(idx) == s.size, f"space {s.id}: {len(idx)} unit indices for {s.size} channels"
            assert not len(idx) or idx.max() < g.num_units, f"space {s.id}: unit index past group {g.id}'s {g.num_units} units"
        for g in self.groups.values():
            assert all(self.spaces[s].group == g.id for s in g.spaces), f"group {g.id} lists a space of another group"
            if g.derived:
                fg, fu = g.factors
                assert fg.shape == fu.shape == (g.num_units, fg.shape[1]), f"group {g.id}: factors of the wrong shape"
                for f in np.unique(fg):
                    h = self.groups.get(int(f))
                    assert h is not None and not h.derived, f"group {g.id}: factor group {f} is gone or a product"
                    assert fu[fg == f].max() < h.num_units, f"group {g.id}: factor unit past group {f}'s units"
        for u, v in self.graph.edges():
            assert u in self.spaces and v in self.spaces, f"edge ({u}, {v}) to a space that is gone"
        for b in self.bindings:
            p = self.params.get(b.param)
            assert p is not None, f"binding of '{b.param}', a tensor that is gone"
            want = self.spaces[b.space].size if b.period is None else b.period
            if b.period is None:
                assert p.shape[b.dim] == want, f"'{p.name}' dim {b.dim} has {p.shape[b.dim]} entries, its space {want}"
        for r in self.reads:
            assert r.node in self.node_dims, f"read by '{r.node}', a node that is gone"
        for br in self.branches.values():
            assert br.add in self.node_dims and br.out in self.node_dims, f"branch {br.id} refers to a node that is gone"

    # ------------------------------------------------------------------ summaries
    def producer_channels(self) -> tuple[int, int]:
        """(prunable, total) output channels of the conv and linear layers the analysis
        understood (depthwise ones included; a shared layer counts once)."""
        seen: set[str] = set()
        prunable = total = 0
        for owner, s in self.layer_outputs:
            if owner in seen or s not in self.spaces:
                continue
            seen.add(owner)
            size = self.spaces[s].size
            total += size
            prunable += size if self.group_of(s).prunable else 0
        return prunable, total

    def prunable_share(self) -> tuple[int, int]:
        """(prunable output channels, output channels of every conv/linear layer)."""
        prunable, understood = self.producer_channels()
        return prunable, max(self.all_channels, understood)

    def frozen_reasons(self) -> dict[str, int]:
        """Distinct reasons for frozen producer channels, with how many channels each freezes
        (the layers inside submodules kept whole, which the analysis never saw, included)."""
        out: dict[str, int] = {}
        seen: set[tuple[str, int]] = set()
        for b in self.bindings:
            if b.role != "producer" or (b.owner, b.space) in seen:
                continue
            seen.add((b.owner, b.space))
            for reason in self.group_of(b.space).frozen[:1]:
                out[reason] = out.get(reason, 0) + self.spaces[b.space].size
        unseen = self.all_channels - self.producer_channels()[1]  # layers the analysis did not read as layers
        if unseen > 0:
            leaves = "; ".join(f"'{path}': {reason}" for path, reason in self.leaves.items())
            why = f"inside submodules kept whole ({leaves}), or " if leaves else ""
            out[f"{why}in conv/linear layers the analysis could not read (computed weights, or groups it does not "
                "prune)"] = unseen
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
