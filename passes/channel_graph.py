"""The one object the passes share: channel spaces, their groups, and residual branches.

A *channel space* is one tensor dimension of one fx node's output that carries channels
(``conv`` output dim 1, ``linear`` output last dim, ...). The analysis links spaces whose
indices are tied (an element-wise add ties its operands index by index; ``cat`` ties each
input to a slice of the output; ``flatten`` ties a channel to each of its features). The
links form a networkx multigraph; a *group* is one connected component, and its *units*
are the classes of channel indices tied together inside it: one unit is what one gate
entry removes.

Everything downstream (gate insertion, compaction, reports) reads this object and never
re-derives channel relations from the fx graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import networkx as nx
import numpy as np

__all__ = ["Space", "Binding", "Read", "Rewrite", "Group", "Branch", "ChannelGraph"]

Role = Literal["producer", "consumer", "carrier"]


@dataclass
class Space:
    """One channel-carrying dimension of one node's output."""

    id: int
    node: str
    dim: int
    size: int
    frozen: str | None = None
    group: int = -1


@dataclass(frozen=True)
class Binding:
    """A parameter or buffer dimension indexed by a channel space.

    ``period`` is set for the input dimension of a grouped convolution, whose weight is
    indexed by ``channel % period``.
    """

    target: str
    dim: int
    space: int
    role: Role
    owner: str
    period: int | None = None


@dataclass(frozen=True)
class Read:
    """A consumer that mixes the channels of ``space``: ``node.args[arg]`` reads them on
    dimension ``dim``. Unit gates are applied here, so a gate at 0 means exactly
    "channel absent"."""

    node: str
    arg: int
    space: int
    dim: int


@dataclass(frozen=True)
class Rewrite:
    """A constant in ``node``'s arguments that must follow the kept size of spaces.

    kinds: ``view`` (``args`` position ``pos`` is the size of ``spaces[0]``), ``slice``
    (getitem bounds on dim ``pos`` of input space ``spaces[0]``), ``split`` (split/chunk
    along dim ``pos`` into ``spaces``, the outputs' spaces)."""

    node: str
    kind: Literal["view", "slice", "split"]
    pos: int
    spaces: tuple[int, ...]


@dataclass
class Group:
    """A connected component of tied spaces: one unit gate vector of length ``num_units``."""

    id: int
    spaces: list[int]
    num_units: int
    unit_index: dict[int, np.ndarray]
    frozen: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.frozen

    def segments(self) -> list[np.ndarray]:
        """The distinct unit sets of the group's spaces (each must keep one unit)."""
        seen = {tuple(np.unique(u)) for u in self.unit_index.values() if len(u)}
        return [np.asarray(s, dtype=np.int64) for s in sorted(seen)]


@dataclass
class Branch:
    """A residual branch ``add(stream, out)`` where ``out = F(x)`` and ``stream`` is ``x``
    or a shortcut of it; removing the ``nodes`` of F turns the add into ``stream``."""

    id: int
    add: str
    stream: str
    out: str
    nodes: frozenset[str]


@dataclass
class ChannelGraph:
    """Result of :func:`fxprune.passes.analyze.analyze`."""

    graph: nx.MultiGraph
    spaces: list[Space]
    groups: list[Group]
    branches: list[Branch]
    bindings: list[Binding]
    reads: list[Read]
    rewrites: list[Rewrite]
    node_dims: dict[str, object]
    leaves: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    def group_of(self, space: int) -> Group:
        return self.groups[self.spaces[space].group]

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def bindings_of(self, group: Group) -> list[Binding]:
        members = set(group.spaces)
        return [b for b in self.bindings if b.space in members]

    def keep_indices(self, space: int, unit_keep: dict[int, np.ndarray]) -> np.ndarray:
        """Indices of ``space`` kept when group ``g`` keeps the units ``unit_keep[g]``
        (a bool array); groups absent from ``unit_keep`` keep everything."""
        s = self.spaces[space]
        keep = unit_keep.get(s.group)
        if keep is None:
            return np.arange(s.size)
        return np.flatnonzero(keep[self.groups[s.group].unit_index[space]])

    def restrict(self, unit_keep: dict[int, np.ndarray]) -> "ChannelGraph":
        """The analysis of the model after the units not in ``unit_keep`` were sliced out:
        spaces shrink, kept units are renumbered, grouped-conv periods follow. (The
        networkx graph keeps its original edges; only groups and spaces are updated.)"""
        spaces = [replace(s, size=len(self.keep_indices(s.id, unit_keep))) for s in self.spaces]
        groups = []
        for g in self.groups:
            keep = unit_keep.get(g.id)
            if keep is None:
                groups.append(g)
                continue
            renumber = np.cumsum(keep) - 1
            index = {s: renumber[u[keep[u]]] for s, u in g.unit_index.items()}
            groups.append(replace(g, num_units=int(keep.sum()), unit_index=index))
        bindings = [
            replace(b, period=int((self.keep_indices(b.space, unit_keep) < b.period).sum())) if b.period else b
            for b in self.bindings
        ]
        return replace(self, spaces=spaces, groups=groups, bindings=bindings)

    def producer_channels(self) -> tuple[int, int]:
        """(prunable, total) output channels of the layers that produce channels."""
        seen: set[tuple[str, int]] = set()
        prunable = total = 0
        for b in self.bindings:
            if b.role != "producer" or (b.owner, b.space) in seen:
                continue
            seen.add((b.owner, b.space))
            size = self.spaces[b.space].size
            total += size
            prunable += size if self.group_of(b.space).prunable else 0
        return prunable, total

    def frozen_reasons(self) -> dict[str, int]:
        """Distinct reasons for frozen producer channels, with how many channels each freezes."""
        out: dict[str, int] = {}
        seen: set[tuple[str, int]] = set()
        for b in self.bindings:
            if b.role != "producer" or (b.owner, b.space) in seen:
                continue
            seen.add((b.owner, b.space))
            for reason in self.group_of(b.space).frozen[:1]:
                out[reason] = out.get(reason, 0) + self.spaces[b.space].size
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
