"""Helpers for tests and sweeps: random gate patterns and the parameter count they imply."""

from __future__ import annotations

import math

import numpy as np
from torch import fx

from .api import channel_graph, gate_state
from .passes.compact import reached_tensors
from .passes.insert_gates import LAYERS, UNITS, gate_modules

__all__ = ["random_masks", "implied_param_count"]


def random_masks(gated: fx.GraphModule, keep: float = 0.5, seed: int = 0) -> fx.GraphModule:
    """Set every gate of ``gated`` to a random 0/1 pattern, in place.

    Each unit gate keeps ``round(keep * n)`` of its ``n`` units (at least one, and at
    least one in every channel space of the group, so no dimension becomes empty); each
    layer gate is dropped with probability ``1 - keep``. Returns ``gated``.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must lie in [0, 1], got {keep}")
    cg = channel_graph(gated)
    rng = np.random.default_rng(seed)
    for key, gate in gate_modules(gated, UNITS).items():
        group = cg.groups[int(key[1:])]
        mask = np.zeros(group.num_units, dtype=bool)
        mask[rng.choice(group.num_units, max(1, round(keep * group.num_units)), replace=False)] = True
        for s in group.spaces:
            units = group.unit_index[s]
            if not mask[units].any():
                mask[rng.choice(units)] = True
        gate.set_keep(mask)
    for gate in gate_modules(gated, LAYERS).values():
        gate.set_keep(np.array([rng.random() < keep]))
    return gated


def implied_param_count(gated: fx.GraphModule) -> int:
    """Number of parameters the compact model must have, given the gates of ``gated``."""
    cg = channel_graph(gated)
    unit_keep, drop = gate_state(gated)
    dead = set().union(*(cg.branches[i].nodes for i in drop)) if drop else set()
    reached = reached_tensors(gated, [n for n in gated.graph.nodes if n.name not in dead])
    bound = {(b.target, b.dim): b for b in cg.bindings}
    total = 0
    for name, p in gated.named_parameters():
        if name not in reached or name.startswith("fxprune_"):
            continue
        dims = []
        for d, n in enumerate(p.shape):
            b = bound.get((name, d))
            if b is None:
                dims.append(n)
                continue
            idx = cg.keep_indices(b.space, unit_keep)
            dims.append(int((idx < b.period).sum()) if b.period else len(idx))
        total += math.prod(dims)
    return total
