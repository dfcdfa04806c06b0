"""Widths a deployment can use: every pruned width a multiple of ``k``
(``PruneConfig.multiple_of``), and repeated blocks alike (``PruneConfig.uniform``).

A *role* is what a gated group does in a repeated block: the parameters bound to it,
their dims and roles, with the block's index in its ``ModuleList`` left out
(``model.layers.3.mlp.gate_proj.weight`` -> ``model.layers.#.mlp.gate_proj.weight``;
a factor group of heads x head_dim by the product's parameters and its factor). Groups of
one role with the same width at prepare form a class (:func:`role_classes`, fixed then,
as the floors are). :class:`Shaper` turns a keep mask into one whose counts are
equal within every class and multiples of ``k`` (or whole), never under a group's floor:

* ``how="max"`` (live removal): a class keeps the widest member's count, rounded up, so
  nothing eval mode keeps is dropped; the extra units stay gated (their gates are off);
* ``how="mean"`` (the decision): a class keeps its members' mean count, rounded to the
  nearest multiple (the budget's cut searches the counts on both sides); each member
  keeps its units of highest score (those the mask keeps first).

Example::

    >>> bank = gate_bank(gated)
    >>> shaper = Shaper(gated, multiple_of=4, uniform=True)
    >>> keep = shaper(bank.theta > 0.5, bank.theta, "mean")   # every count a multiple of 4
    >>> keep.shape == bank.theta.shape
    True
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor, fx

from .passes.channel_graph import ChannelGraph
from .state import gate_bank, state_of

__all__ = ["role_classes", "Shaper"]

#: a block's index in a ModuleList (``layers.3.``, ``h.11.``)
_INDEX = re.compile(r"\.\d+(?=\.)")


def role_classes(cg: ChannelGraph, groups: list[int]) -> list[list[int]]:
    """The gated ``groups`` that play one role in repeated blocks, with one width: classes
    of at least two, each in the order of the groups."""
    by_group: dict[int, set] = defaultdict(set)
    for b in cg.bindings:
        by_group[cg.spaces[b.space].group].add((_INDEX.sub(".#", b.param), b.dim, b.role))
    keys: dict[int, set] = {g: set(by_group.get(g, ())) for g in groups}
    for p in cg.groups.values():
        if p.derived:
            for f, ids in enumerate(p.factor_ids()):
                for g in ids:
                    if g in keys:
                        keys[g] |= {(*k, f) for k in by_group.get(p.id, ())}
    classes: dict[tuple, list[int]] = defaultdict(list)
    for g in groups:
        if keys[g] and any("#" in k[0] for k in keys[g]):
            classes[(frozenset(keys[g]), cg.groups[g].num_units)].append(g)
    return [c for c in classes.values() if len(c) > 1]


class Shaper:
    """The counts ``multiple_of`` and ``uniform`` allow, for the gates of ``gated`` as they
    are laid out now (see the module's docstring)."""

    def __init__(self, gated: fx.GraphModule, multiple_of: int | None, uniform: bool) -> None:
        self.gated, self.multiple, self.uniform = gated, multiple_of, uniform

    def __bool__(self) -> bool:
        return bool(self.multiple and self.multiple > 1) or self.uniform

    def __call__(self, keep: Tensor, score: Tensor, how: str) -> Tensor:
        if not self:
            return keep
        bank, units = gate_bank(self.gated), state_of(self.gated).layout.units
        kept = keep.detach().cpu().numpy() > 0
        prio = 2.0 * kept + score.detach().cpu().to(torch.float64).numpy()  # what the mask keeps comes first
        count = {g: int(kept[sl].sum()) for g, sl in units.items()}
        if self.uniform:
            for members in bank.roles:
                present = [g for g in members if g in units]
                if len(present) > 1:
                    c = max(count[g] for g in present) if how == "max" else math.ceil(np.mean([count[g] for g in present]))
                    count.update(dict.fromkeys(present, c))
        out = kept.copy()
        for g, sl in units.items():
            n = sl.stop - sl.start
            c = max(count[g], min(n, bank.floors.get(g, 1)))
            if self.multiple:  # up in live removal (eval mode's units stay), to the nearest multiple at the decision
                k = self.multiple
                c = min(n, math.ceil(c / k) * k if how == "max" else max(k, round(c / k) * k))
            order = np.argsort(-prio[sl], kind="stable")
            out[sl] = False
            out[sl.start + order[:min(c, n)]] = True
        return torch.as_tensor(out, device=keep.device).to(keep.dtype)
