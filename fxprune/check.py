"""The pruning check: which switched-off structures may go now (method.md section 4).

A structure goes when its theta has been at or below ``theta_tol`` for ``patience``
checks in a row and its weights are in the domain of attraction of zero: their RMS at
most ``w_tol`` times that of the kept weights (a unit against the kept units of its
group, a layer against the weights outside every switched-off branch). What eval mode
keeps stays anyway. Under a process group rank 0 decides for every process.

The counters are per flat theta entry and follow removals through the record's
``theta_index`` (:class:`fxprune.state.Removal`).

Example::

    >>> check = PruningCheck(pruner.config, state_of(gated).layout.size)
    >>> print(check(gated, pruner.objective, optimizer))   # None, or (units per group, branches)
    None
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from . import distributed, optim_state
from .config import PruneConfig
from .objective import Objective
from .state import Removal, gate_bank, state_of

__all__ = ["PruningCheck"]


class PruningCheck:
    """The pruning conditions of ``config`` over a flat theta buffer of ``size`` entries."""

    def __init__(self, config: PruneConfig, size: int) -> None:
        self.config = config
        #: consecutive checks each flat theta entry has been switched off
        self.below = np.zeros(size, dtype=np.int64)

    def follow(self, record: Removal) -> None:
        """The counters of the entries a removal kept, in their new places."""
        self.below = self.below[record.theta_index]

    def decided(self, theta: torch.Tensor) -> None:
        """At the decision: an entry it switched off goes at the next check."""
        off = (theta <= self.config.theta_tol).cpu().numpy()
        self.below = np.where(off, np.maximum(self.below, self.config.patience - 1), self.below)

    @torch.no_grad()
    def __call__(self, gated: fx.GraphModule, objective: Objective,
                 optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[int, np.ndarray], set[int]] | None:
        """What may be removed now (``({group: drop mask}, {branch})``), or None. Reads the
        thetas and weight norms once. With ``reset_moments``, the optimizer state of
        entries first found ripe is zeroed."""
        c, state = self.config, state_of(gated)
        theta_t = gate_bank(gated).theta.detach()
        per_weight, per_structure = objective.squared_norms()
        theta = theta_t.cpu().numpy()
        sq, elems = per_structure.cpu().numpy(), objective.elems.cpu().numpy()
        off = theta <= c.theta_tol
        self.below = np.where(off, self.below + 1, 0)
        ripe = self.below >= c.patience
        if not ripe.any() and not distributed.active():  # under a process group every rank reaches the broadcast
            return None
        rms = np.sqrt(sq / np.maximum(elems, 1))
        ref = np.zeros_like(rms)
        for sl in state.layout.units.values():  # units: against the kept units of their group
            kept = ~off[sl] if (~off[sl]).any() else np.ones(sl.stop - sl.start, dtype=bool)
            ref[sl] = np.sqrt(sq[sl][kept].sum() / max(elems[sl][kept].sum(), 1))
        if state.layout.layers:  # layers: against the weights outside every switched-off branch
            w_sq = per_weight.cpu().numpy()
            sizes = np.array([w.numel() for w in objective.weights], dtype=float)
            inside = np.zeros(len(sizes), dtype=bool)
            layer_w, layer_s = objective.layer_weights()
            inside[layer_w[off[layer_s]]] = True
            outside = ~inside if (~inside).any() else np.ones_like(inside)
            ref[list(state.layout.layers.values())] = np.sqrt(w_sq[outside].sum() / max(sizes[outside].sum(), 1))
        drop = ripe & (rms <= c.w_tol * ref) if c.w_tol is not None else ripe
        drop &= ~(gate_bank(gated).deterministic().cpu().numpy() > 0)  # what eval mode keeps stays anyway
        if distributed.active():  # rank 0 decides for every process
            masks = distributed.broadcast_(torch.as_tensor(np.stack([drop, ripe])).to(torch.uint8)).numpy().astype(bool)
            drop, ripe = masks[0], masks[1]
        if not ripe.any():
            return None
        if c.reset_moments and optimizer is not None:  # once, when first ripe: later momentum is the prior's pull
            self.reset_moments(gated, objective, optimizer, ripe & ~drop & (self.below == c.patience))
        if not drop.any():
            return None
        units = {g: drop[sl] for g, sl in state.layout.units.items() if drop[sl].any()}
        layers = {b for b, i in state.layout.layers.items() if drop[i]}
        return units, layers

    @staticmethod
    def reset_moments(gated: fx.GraphModule, objective: Objective, optimizer: torch.optim.Optimizer,
                      reset: np.ndarray) -> None:
        """Zero the optimizer state (momentum, Adam moments) of the switched-off entries.
        A switched-off structure gets no data gradient any more, only the spike prior's
        pull to zero; moments remembered from its active past would damp that pull for
        thousands of steps under Adam (second moments decay with 1 - beta2 = 1e-3), and the
        structure would never reach the weight condition. Done once per switch-off: the
        momentum built afterwards is that pull's own, and zeroing it again slows it."""
        if not reset.any():
            return
        for w, dim, slots in objective.unit_channels():
            hit = np.flatnonzero(reset[slots])
            if len(hit):
                optim_state.zero_entries(optimizer, w, dim, torch.as_tensor(hit))
        for b, i in state_of(gated).layout.layers.items():
            if reset[i]:
                for w in objective.branch_weights(b):
                    if w.dim():
                        optim_state.zero_entries(optimizer, w, 0, torch.arange(w.shape[0]))
