"""Random gate patterns and the parameter count they imply, for tests and sweeps."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from ..passes.units import floor_keep
from ..state import decisions, gate_bank, set_decisions, state_of

__all__ = ["random_masks", "implied_param_count"]


def random_masks(gated: fx.GraphModule, keep: float = 0.5, seed: int = 0) -> fx.GraphModule:
    """Set every gate of ``gated`` to a random 0/1 pattern, in place.

    Each unit gate keeps ``round(keep * n)`` of its ``n`` units (at least one, and at
    least its floor in every channel space of the group, as eval mode keeps, so no
    dimension becomes empty); each
    layer gate is dropped with probability ``1 - keep``. Returns ``gated``.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must lie in [0, 1], got {keep}")
    layout = state_of(gated).layout
    rng = np.random.default_rng(seed)
    flat = np.zeros(layout.size, dtype=bool)
    for sl in layout.units.values():
        n = sl.stop - sl.start
        flat[sl.start + rng.choice(n, max(1, round(keep * n)), replace=False)] = True
    scores = torch.as_tensor(rng.random(layout.size))
    bank = gate_bank(gated)
    flat = floor_keep(torch.as_tensor(flat), scores, bank.segments.cpu(), bank.least.cpu()).numpy()
    set_decisions(gated, {g: flat[sl] for g, sl in layout.units.items()},
                  {b: bool(rng.random() < keep) for b in layout.layers})
    return gated


def implied_param_count(gated: fx.GraphModule) -> int:
    """Number of parameters the compact model must have, given the gates of ``gated``:
    from the ChannelGraph alone (parameters by identity, the kept size of every bound
    dimension, tensors that dropped branches or dead code take with them)."""
    cg = state_of(gated).graph
    unit_keep, drop = decisions(gated)
    bound = {(b.param, b.dim): b for b in cg.bindings}
    total = 0
    for p in cg.params.values():
        if p.buffer or not p.used or set(p.branches) & drop:
            continue
        total += math.prod(cg.kept_size(bound[(p.name, d)], unit_keep) if (p.name, d) in bound else n
                           for d, n in enumerate(p.shape))
    return total
