"""The record a gated model carries: one :class:`PruneState` under one ``gm.meta`` key.

It holds the ChannelGraph (the analysis of the model as it is now), the config, one
example input for re-running the model (FLOP counts, postconditions), the batch dim of
every input, and the :class:`GateLayout`: where each gate's thetas sit in the one flat
theta buffer. Gates are named by typed references, :class:`UnitGate` (a channel group)
and :class:`LayerGate` (a residual branch), never by strings parsed back into numbers.

Example::

    >>> state = state_of(gated)
    >>> state.layout.slot(UnitGate(min(state.layout.units)))      # where a group's thetas lie
    slice(0, 16, None)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .config import CostReference, PruneConfig
from .gates import GateBank
from .passes.channel_graph import ChannelGraph
from .passes.insert_gates import BANK

__all__ = ["PruneState", "Removal", "GateLayout", "UnitGate", "LayerGate", "GateRef", "STATE", "state_of", "gate_bank", "decisions",
           "run_example", "example_for", "set_decisions", "theta_of"]

#: the ``gm.meta`` key of a gated model's :class:`PruneState`
STATE = "fxprune"
#: the ``gm.meta`` key of the (weak) reference to the gated model's Pruner
PRUNER = "fxprune_pruner"


@dataclass(frozen=True)
class UnitGate:
    """The unit gates of channel group ``group``."""

    group: int


@dataclass(frozen=True)
class LayerGate:
    """The layer gate of residual branch ``branch``."""

    branch: int


GateRef = UnitGate | LayerGate


@dataclass
class GateLayout:
    """Where the thetas of each gate sit in the flat buffer: the units of every gated
    group (in group order), then one entry per gated branch (in branch order)."""

    units: dict[int, slice] = field(default_factory=dict)
    layers: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(cls, groups: dict[int, int], branches: list[int]) -> GateLayout:
        """From ``{group id: number of units}`` and the gated branch ids."""
        units, start = {}, 0
        for gid in sorted(groups):
            units[gid] = slice(start, start + groups[gid])
            start += groups[gid]
        return cls(units, {b: start + i for i, b in enumerate(sorted(branches))})

    @property
    def size(self) -> int:
        return sum(s.stop - s.start for s in self.units.values()) + len(self.layers)

    @property
    def num_units(self) -> int:
        return sum(s.stop - s.start for s in self.units.values())

    def refs(self) -> list[GateRef]:
        return [UnitGate(g) for g in self.units] + [LayerGate(b) for b in self.layers]

    def slot(self, ref: GateRef) -> slice:
        """The flat entries of one gate."""
        if isinstance(ref, UnitGate):
            if ref.group not in self.units:
                raise ValueError(f"group {ref.group} has no unit gate of its own (a frozen group, or a product of heads "
                                 f"and head_dim gated through its factors); gated groups: {sorted(self.units)}")
            return self.units[ref.group]
        i = self.layers[ref.branch]
        return slice(i, i + 1)

    def unit_slots(self, group: int, units: np.ndarray) -> np.ndarray:
        """Flat indices of ``units`` of ``group``."""
        return self.units[group].start + np.asarray(units, dtype=np.int64)

    def is_layer(self) -> np.ndarray:
        """A bool mask over the flat buffer: True at layer gates."""
        mask = np.zeros(self.size, dtype=bool)
        mask[list(self.layers.values())] = True
        return mask

    def restrict(self, unit_keep: dict[int, np.ndarray], drop: set[int], cg: ChannelGraph) -> tuple[GateLayout, np.ndarray]:
        """The layout after removal (``unit_keep`` as given to ``cg.restrict``; groups no
        longer in ``cg`` and branches in ``drop`` are gone), and the bool mask over the
        old flat buffer of the entries that stay."""
        keep = np.ones(self.size, dtype=bool)
        groups: dict[int, int] = {}
        for gid, sl in self.units.items():
            if gid not in cg.groups:
                keep[sl] = False
                continue
            k = unit_keep.get(gid)
            if k is not None:
                keep[sl] = k
            groups[gid] = int(keep[sl].sum())
        branches = []
        for b, i in self.layers.items():
            if b in drop or b not in cg.branches:
                keep[i] = False
            else:
                branches.append(b)
        return GateLayout.build(groups, branches), keep


@dataclass(eq=False)
class Removal:
    """The record of one live removal (:func:`fxprune.live_compaction.remove`), enough to
    replay it and for anything derived from the model to follow it:

    - ``units``: units removed per group; ``layers``: the residual branches removed;
      ``keep``: the keep mask of every group it sliced, over that group's units before;
    - ``theta_index``: new flat theta entry ``i`` was entry ``theta_index[i]`` before
      (every per-gate counter and slice follows it); ``before`` / ``after``: the gate
      layouts on either side (:meth:`index_map` per gate);
    - ``slices``: by parameter or buffer name, the ``(dim, kept indices)`` applied to it;
      ``deleted``: the names of the parameters and buffers removed with their branches
      (fxprune's own gate-read indices are re-derived from ``after``, not recorded);
    - ``version``: :attr:`PruneState.version` after it; ``step``: the training step;
      ``flops``: forward FLOPs per example after it."""

    units: dict[int, int]
    layers: list[int]
    keep: dict[int, list[bool]]
    flops: int = 0
    step: int = 0
    version: int = 0
    theta_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    before: GateLayout = field(default_factory=GateLayout)
    after: GateLayout = field(default_factory=GateLayout)
    slices: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    deleted: tuple[str, ...] = ()

    def index_map(self, ref: GateRef) -> np.ndarray:
        """For the entries of gate ``ref`` before the removal: the entry each became after
        it, or -1 where it was removed."""
        old = self.before.slot(ref)
        new = np.full(self.before.size, -1, dtype=np.int64)
        new[self.theta_index] = np.arange(len(self.theta_index))
        return new[old]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Removal):
            return NotImplemented
        same = (self.units, self.layers, self.keep, self.flops, self.step, self.version, self.before, self.after,
                self.deleted) == (other.units, other.layers, other.keep, other.flops, other.step, other.version,
                                  other.before, other.after, other.deleted)
        return same and np.array_equal(self.theta_index, other.theta_index) and self.slices.keys() == other.slices.keys() \
            and all(len(a) == len(b) and all(d == e and np.array_equal(i, j) for (d, i), (e, j) in zip(a, b))
                    for a, b in ((self.slices[k], other.slices[k]) for k in self.slices))


@dataclass
class PruneState:
    """Everything fxprune knows about a gated model, under ``gm.meta["fxprune"]``."""

    graph: ChannelGraph
    config: PruneConfig
    layout: GateLayout
    example: tuple[Any, ...]
    batch_dims: dict[str, int | None]
    #: bumped by every live removal: whatever is derived from the model (the objective's indices, the
    #: pruner's counters, a wrapper holding parameter references) re-derives when it changes
    version: int = 0
    #: every live removal so far, in order (``removals[k].version == k + 1``)
    removals: list[Removal] = field(default_factory=list)
    #: the model's class and a copy of its ``config`` attribute (transformers' models), or None
    origin: tuple[type, Any] | None = None
    #: the analysis and gate layout as prepared, before any removal
    dense_graph: ChannelGraph | None = None
    dense_layout: GateLayout | None = None
    #: the prepared model's cost (FLOPs, parameters, gates) and the FLOPs of its ops without weights, recorded
    #: by the first Objective (or before a state dict's removals are replayed): what fractions are of
    dense_cost: tuple[CostReference, float] | None = None
    #: a Pruner's state that came with a loaded state dict before the Pruner was built: the next one loads it
    pending_pruner: dict | None = None


#: ``compact.meta`` key of :class:`CompactOrigin`
COMPACT = "fxprune_compact"


@dataclass
class CompactOrigin:
    """What a compact model was converted from: the gated model's analysis, the units kept
    of every gated group and the branches dropped, the prepared model's class and config,
    and the stored example (``compact.meta["fxprune_compact"]``)."""

    graph: ChannelGraph
    unit_keep: dict[int, np.ndarray]
    dropped: set[int]
    origin: tuple[type, Any] | None
    example: tuple[Any, ...]


def state_of(gm: fx.GraphModule) -> PruneState:
    """The :class:`PruneState` of a gated model; a clear error for anything else."""
    state = getattr(gm, "meta", {}).get(STATE) if isinstance(gm, fx.GraphModule) else None
    if not isinstance(state, PruneState):
        raise ValueError(f"not a gated model ({type(gm).__name__}): build it with fxprune.prepare(model, example_inputs)")
    return state


def gate_bank(gated: fx.GraphModule) -> GateBank:
    """The module holding every theta of ``gated``."""
    state_of(gated)
    bank = gated.get_submodule(BANK)
    assert isinstance(bank, GateBank), f"'{BANK}' of the gated model is a {type(bank).__name__}, not a GateBank"
    return bank


def decisions(gated: fx.GraphModule) -> tuple[dict[int, np.ndarray], set[int]]:
    """Deterministic gate decisions (what eval mode and ``convert`` use): kept units per
    gated group id, and dropped branch ids."""
    layout = state_of(gated).layout
    keep = gate_bank(gated).deterministic().detach().cpu().numpy() > 0
    return {g: keep[sl] for g, sl in layout.units.items()}, {b for b, i in layout.layers.items() if not keep[i]}


def example_for(model: nn.Module, example: tuple[Any, ...]) -> tuple[Any, ...]:
    """``example`` on the model's device, its floating tensors in the model's floating
    dtype (after ``gated.to(torch.bfloat16)`` or ``.cuda()``); integer inputs (token ids,
    masks) keep theirs."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        return example
    return tuple(t.to(weight.device, weight.dtype if t.is_floating_point() else t.dtype)
                 if isinstance(t, torch.Tensor) else t for t in example)


def run_example(model: nn.Module, example: tuple[Any, ...]) -> Any:
    """``model`` on ``example`` (:func:`example_for`) in eval mode, without grad."""
    example = example_for(model, example)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*example)
    finally:
        model.train(was)


def set_decisions(gated: fx.GraphModule, unit_keep: dict[int, np.ndarray], layer_keep: dict[int, bool]) -> None:
    """Set thetas to the 0/1 pattern ``unit_keep`` (per gated group) and ``layer_keep``
    (per gated branch); gates not named keep their thetas."""
    layout, theta = state_of(gated).layout, gate_bank(gated).theta
    with torch.no_grad():
        for g, keep in unit_keep.items():
            theta[layout.units[g]] = torch.as_tensor(np.asarray(keep, dtype=np.float32), device=theta.device)
        for b, keep in layer_keep.items():
            theta[layout.layers[b]] = float(bool(keep))


def theta_of(gated: fx.GraphModule, ref: GateRef) -> torch.Tensor:
    """The thetas of one gate: a view into the flat buffer (writes under ``no_grad`` go
    through to the model)."""
    return gate_bank(gated).theta[state_of(gated).layout.slot(ref)]
