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

    >>> cg = analyze(trace(model, (x,)))
    >>> g = cg.prunable_groups[0]
    >>> [cg.params[b.param].names for b in cg.bindings_of(g)]
    [('conv1.weight',), ('bn1.weight',), ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
import numpy as np
import torch

__all__ = ["Space", "Param", "Binding", "Read", "Rewrite", "Group", "Branch", "OpFlops", "ChannelGraph", "floor_keep", "segment_matrix"]

Role = Literal["producer", "consumer", "carrier"]


@dataclass
class Space:
    """One channel-carrying dimension of one node's output (``batch``: the batch dimension,
    followed by the same rules and always frozen)."""

    id: int
    node: str
    dim: int
    size: int
    frozen: str | None = None
    group: int = -1
    batch: bool = False


@dataclass(frozen=True)
class Param:
    """A parameter or buffer, by identity: a tensor reached under several names (tied
    weights, a shared module) is one ``Param`` with all its ``names``; ``name`` is the
    first of them in module order.

    ``flops`` is the forward FLOPs per example each entry costs (two per multiply-add
    of a convolution or linear weight, summed over every call; 0 for biases and norm
    affines); ``branches`` are the residual branches whose removal deletes the tensor
    (every node that reaches it lies inside them); ``used`` is False for a tensor no node
    the output depends on reaches (compaction deletes it)."""

    name: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    buffer: bool
    flops: float = 0.0
    branches: tuple[int, ...] = ()
    used: bool = True

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass(frozen=True)
class Binding:
    """A parameter dimension indexed by a channel space. ``param`` is a canonical name
    (:attr:`Param.name`). ``period`` is set for the input dimension of a grouped
    convolution, whose weight is indexed by ``channel % period``."""

    param: str
    dim: int
    space: int
    role: Role
    owner: str
    period: int | None = None


@dataclass(frozen=True)
class Read:
    """A consumer that mixes the channels of ``space``: ``node.args[arg]`` reads them on
    dimension ``dim``; ``batch_dim`` is that tensor's batch dimension (``None`` where
    the analysis lost track of it, e.g. after a reshape merging batch and sequence).
    Unit gates are applied here, so a gate at 0 means exactly "channel absent".

    ``kind`` says how: ``"mask"`` multiplies the channels by their gates; ``"norm"`` is a
    normalisation (LayerNorm, RMSNorm) over ``dim`` whose statistics count only the
    channels whose gate is on, so the gated model computes what the compact one, with the
    plain norm over the kept width, computes."""

    node: str
    arg: int
    space: int
    dim: int
    batch_dim: int | None = 0
    kind: Literal["mask", "norm"] = "mask"


@dataclass(frozen=True)
class Rewrite:
    """A constant in ``node``'s arguments that must follow the kept size of spaces.

    kinds: ``sizes`` (entry ``pos`` of the sizes a view/reshape/expand/unflatten is
    given is the size of ``spaces[0]``), ``slice`` (getitem bounds at index position
    ``pos`` of input space ``spaces[0]``), ``split`` (split/chunk along dim ``pos`` into
    ``spaces``, the outputs' spaces), ``norm`` (the normalised shape of a LayerNorm or
    RMSNorm over ``spaces[0]``: argument ``pos`` of the function, or the module's
    ``normalized_shape``), ``scale`` (attention whose head_dim is ``spaces[0]`` is given
    the dense default scale ``pos ** -0.5``)."""

    node: str
    kind: Literal["sizes", "slice", "split", "norm", "scale"]
    pos: int
    spaces: tuple[int, ...]


@dataclass
class Group:
    """A connected component of tied spaces: one unit gate vector of length ``num_units``.
    ``per_example`` is False when some read of the group has no batch dimension: its
    gate then samples one mask per batch instead of one per example."""

    id: int
    spaces: list[int]
    num_units: int
    unit_index: dict[int, np.ndarray]
    frozen: list[str] = field(default_factory=list)
    per_example: bool = True
    #: a *product* group (a channel dim viewed into heads x head_dim): no gate of its own;
    #: unit ``u`` is kept when every factor keeps it: group ``factors[0][u, f]`` keeps its
    #: unit ``factors[1][u, f]``. None for a group with its own gate.
    factors: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def prunable(self) -> bool:
        return not self.frozen

    @property
    def derived(self) -> bool:
        """A product group: its units are removed through its factor groups' gates."""
        return self.factors is not None

    def factor_ids(self) -> list[list[int]]:
        """Per factor (heads, head_dim), the ids of the groups it comes from, first seen
        first (a packed q/k/v projection's head_dim may come from two); [] for a group with
        its own gate."""
        return [list(dict.fromkeys(col.tolist())) for col in self.factors[0].T] if self.derived else []

    def segments(self) -> list[np.ndarray]:
        """The distinct unit sets of the group's spaces (each must keep one unit)."""
        seen = {tuple(np.unique(u)) for u in self.unit_index.values() if len(u)}
        return [np.asarray(s, dtype=np.int64) for s in sorted(seen)]


@dataclass(frozen=True)
class Branch:
    """A residual branch ``add(stream, out)`` where ``out = F(x)`` and ``stream`` is ``x``
    or a shortcut of it; removing the ``nodes`` of F turns the add into ``stream``.
    ``params`` are the tensors only F reaches (canonical names), ``batch_dim`` the batch
    dimension of ``out``."""

    id: int
    add: str
    stream: str
    out: str
    nodes: frozenset[str]
    params: tuple[str, ...] = ()
    batch_dim: int | None = 0


@dataclass(frozen=True)
class OpFlops:
    """The FLOPs of an op without weights whose size follows channel spaces (attention's
    ``q @ k^T`` over heads and head_dim, ``attn @ v``): ``per_entry`` FLOPs per example
    for every combination of the channels of ``spaces``; ``branches`` are the residual
    branches it lies in."""

    node: str
    per_entry: float
    spaces: tuple[int, ...]
    branches: tuple[int, ...] = ()


def segment_matrix(segments: list[np.ndarray], offset: int = 0) -> torch.Tensor:
    """Unit sets as one ``[segments, width]`` index matrix (``offset`` added), padded with -1."""
    width = max((len(s) for s in segments), default=0)
    pad = np.full((len(segments), width), -1, dtype=np.int64)
    for i, seg in enumerate(segments):
        pad[i, : len(seg)] = np.asarray(seg) + offset
    return torch.as_tensor(pad)


def floor_keep(keep: torch.Tensor, score: torch.Tensor, segments: torch.Tensor,
               least: int | torch.Tensor = 1) -> torch.Tensor:
    """``keep`` (bool) with, in every segment (a row of :func:`segment_matrix`) that would
    keep fewer than ``least`` units (an int, or one per segment), its ``least`` units of
    highest ``score`` kept too (all of a shorter segment; the first ones among equal
    scores): a channel dimension never becomes empty, nor falls under its floor. Tensor
    ops only, so it runs on the gates' device without a host sync."""
    if not segments.numel():
        return keep
    valid = segments >= 0
    units = segments.clamp_min(0)
    scores = torch.where(valid, score[units].to(torch.float32), torch.tensor(-1.0, device=score.device))
    if isinstance(least, torch.Tensor):
        least = least.to(segments.device)
        order = scores.sort(dim=1, descending=True, stable=True).indices
        wanted = torch.arange(segments.shape[1], device=segments.device)[None, :] < least[:, None]
    else:
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, :min(least, segments.shape[1])]
        wanted = torch.ones((), dtype=torch.bool, device=segments.device)
    # a stable order: among equal scores the first unit, which stays the one picked when
    # other units are removed (live removal must not change what eval mode keeps)
    best, best_valid = units.gather(1, order), valid.gather(1, order) & wanted  # [segments, k]
    short = (keep[units] & valid).sum(1) < least
    add = (short[:, None] & best_valid).to(torch.uint8)
    return keep.to(torch.uint8).scatter_reduce(0, best.flatten(), add.flatten(), reduce="amax").bool()


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
                return tuple(len({(int(a), int(b)) for a, b in zip(g.factors[0][units, i], g.factors[1][units, i])})
                             for i in range(2))
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
