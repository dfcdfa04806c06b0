"""The pruner: projected SGD on theta, pruning checks, and live removal during training.

    pruner = fxprune.Pruner(gated, optimizer)
    for x, y in loader:
        loss = criterion(gated(x), y) + pruner.penalty()
        optimizer.zero_grad(); loss.backward(); optimizer.step(); pruner.step()

``step()`` updates every theta at once (one flat buffer) and makes no host
synchronisation; every ``check_every`` steps a check reads the thetas once and removes a
structure whose theta has been at or below ``theta_tol`` for ``patience`` checks and
whose weights are in the domain of attraction of zero (RMS at most ``w_tol`` times that
of the kept weights). Removal compacts the live model as one transaction
(:mod:`fxprune.live_compaction`): parameters, gradients and optimizer state are sliced,
removed branches leave the optimizer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, fx

from . import live_compaction, optim_state
from .config import PruneConfig
from .cost import forward_flops
from .objective import Objective
from .state import gate_bank, state_of

__all__ = ["Pruner"]


class Pruner:
    """Learns the gates of ``gated`` next to the user's ``optimizer`` and removes
    structures during training. ``config`` defaults to the one given to ``prepare``."""

    def __init__(self, gated: fx.GraphModule, optimizer: torch.optim.Optimizer, config: PruneConfig | None = None) -> None:
        state = state_of(gated)
        self.gated, self.optimizer = gated, optimizer
        self.config = config or state.config
        if not state.layout.size:
            cg = state.graph
            reasons = sorted({g.frozen[0] for g in cg.groups.values() if g.frozen})[:5]
            raise ValueError(
                "the model has no prunable structure: every channel group is frozen and there is no residual "
                f"branch (reasons: {'; '.join(reasons)})")
        optim_state.check_optimizer(optimizer)
        gate_bank(gated).theta.requires_grad_(True)
        self.objective = Objective(gated, self.config)
        self.steps = 0
        #: consecutive checks each flat theta entry has been switched off
        self.below = np.zeros(state.layout.size, dtype=np.int64)
        #: forward FLOPs per example of the live model, one entry per step
        self.flops_per_step: list[int] = []
        #: every live removal so far (:class:`fxprune.live_compaction.Removal`)
        self.removals: list[live_compaction.Removal] = []
        self.dense_flops = self.objective.dense_flops
        self._flops = self.dense_flops
        device = self.theta.device
        self._step_t = torch.zeros((), dtype=torch.long, device=device)
        self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)

    # ----------------------------------------------------------------- training loop
    @property
    def theta(self) -> Tensor:
        """Every theta, in one flat buffer (``fxprune.state.state_of(gated).layout`` says where)."""
        return gate_bank(self.gated).theta

    def penalty(self) -> Tensor:
        """GSM prior plus ``gamma * C(theta)``; add it to the task loss."""
        return self.objective.penalty(self.gamma())

    def gamma(self) -> float:
        """The cost strength at this step: ``gamma``, ramped linearly over ``warmup`` steps."""
        c = self.config
        return c.gamma * min(1.0, self.steps / c.warmup) if c.warmup else c.gamma

    @torch.no_grad()
    def step(self) -> live_compaction.Removal | None:
        """Projected SGD on theta; every ``check_every`` steps, the pruning check.
        Returns what was removed at this step, if anything."""
        theta = self.theta
        grad = theta.grad
        if grad is not None:
            finite = torch.isfinite(grad)
            first = (self._first_nonfinite < 0) & ~finite.all()
            self._first_nonfinite.copy_(torch.where(first, self._step_t, self._first_nonfinite))
            theta.sub_(self.config.theta_lr * torch.where(finite, grad, 0.0)).clamp_(0.0, 1.0)
            theta.grad = None
        self._step_t.add_(1)
        self.steps += 1
        self.flops_per_step.append(self._flops)
        return self.check() if self.steps % self.config.check_every == 0 else None

    # ----------------------------------------------------------------- pruning conditions
    @torch.no_grad()
    def check(self) -> live_compaction.Removal | None:
        """Apply the pruning conditions and remove what meets them (reads the thetas and
        weight norms once: the only host synchronisation of training)."""
        first = int(self._first_nonfinite)
        if first >= 0:
            raise FloatingPointError(
                f"the theta gradient was not finite at step {first}: the loss diverged; "
                "lower the weight learning rate or gamma")
        c, obj = self.config, self.objective
        state = state_of(self.gated)
        per_weight, per_structure = obj.squared_norms()
        theta = self.theta.detach().cpu().numpy()
        sq, elems = per_structure.cpu().numpy(), obj.elems.cpu().numpy()
        off = theta <= c.theta_tol
        self.below = np.where(off, self.below + 1, 0)
        ripe = self.below >= c.patience
        if not ripe.any():
            return None
        rms = np.sqrt(sq / np.maximum(elems, 1))
        ref = np.zeros_like(rms)
        for sl in state.layout.units.values():  # units: against the kept units of their group
            kept = ~off[sl] if (~off[sl]).any() else np.ones(sl.stop - sl.start, dtype=bool)
            ref[sl] = np.sqrt(sq[sl][kept].sum() / max(elems[sl][kept].sum(), 1))
        if state.layout.layers:  # layers: against the weights outside every switched-off branch
            w_sq = per_weight.cpu().numpy()
            sizes = np.array([w.numel() for w in obj.weights], dtype=float)
            inside = np.zeros(len(sizes), dtype=bool)
            layer_w, layer_s = obj._layer_w.cpu().numpy(), obj._layer_s.cpu().numpy()
            inside[layer_w[off[layer_s]]] = True
            outside = ~inside if (~inside).any() else np.ones_like(inside)
            ref[list(state.layout.layers.values())] = np.sqrt(w_sq[outside].sum() / max(sizes[outside].sum(), 1))
        drop = ripe & (rms <= c.w_tol * ref)
        if c.reset_moments:
            self._reset_moments(ripe & ~drop)
        if not drop.any():
            return None
        units = {g: drop[sl] for g, sl in state.layout.units.items() if drop[sl].any()}
        layers = {b for b, i in state.layout.layers.items() if drop[i]}
        return self.remove(units, layers)

    def _reset_moments(self, reset: np.ndarray) -> None:
        """Zero the optimizer state (momentum, Adam moments) of the switched-off entries.
        A switched-off structure gets no data gradient any more, only the spike prior's
        pull to zero; moments remembered from its active past would damp that pull for
        thousands of steps under Adam (second moments decay with 1 - beta2 = 1e-3), and the
        structure would never reach the weight condition."""
        if not reset.any():
            return
        for w, dim, slots in self.objective.unit_channels():
            hit = np.flatnonzero(reset[slots])
            if len(hit):
                optim_state.zero_entries(self.optimizer, w, dim, torch.as_tensor(hit))
        state = state_of(self.gated)
        for b, i in state.layout.layers.items():
            if reset[i]:
                for w in self.objective.branch_weights(b):
                    if w.dim():
                        optim_state.zero_entries(self.optimizer, w, 0, torch.arange(w.shape[0]))

    # ----------------------------------------------------------------- live removal
    def remove(self, unit_drop: dict[int, np.ndarray], layer_drop: set[int],
               verify: bool = True) -> live_compaction.Removal:
        """Remove units (``unit_drop[group]``: True = remove) and branches from the live
        model and its optimizer (:func:`fxprune.live_compaction.remove`)."""
        record = live_compaction.remove(self.gated, unit_drop, layer_drop, self.optimizer, verify=verify)
        record.step = self.steps
        self.below = self.below[record.extra.pop("kept")]
        self.objective.rebuild()
        self._flops = record.flops
        self.removals.append(record)
        return record

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Steps, patience counters, FLOPs history and every removal with its keep masks:
        with the model's and optimizer's state dicts, enough to resume exactly."""
        return {
            "steps": self.steps,
            "below": self.below.tolist(),
            "flops_per_step": list(self.flops_per_step),
            "removals": [{"step": r.step, "units": dict(r.units), "layers": list(r.layers), "flops": r.flops,
                          "keep": {g: list(k) for g, k in r.keep.items()}} for r in self.removals],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replay the saved removals on this pruner's freshly prepared model and optimizer
        (so parameter and optimizer shapes match the checkpoint), then restore the counters.
        Load the model's and the optimizer's state dicts after this."""
        if self.removals or self.steps:
            raise RuntimeError(
                "Pruner.load_state_dict needs a fresh pruner: build the gated model, optimizer and Pruner "
                "again as at the start of training, then load the checkpoint")
        for saved in state["removals"]:
            keep = {int(g): np.asarray(k, dtype=bool) for g, k in saved["keep"].items()}
            record = self.remove({g: ~k for g, k in keep.items()}, set(saved["layers"]), verify=False)
            record.step = int(saved["step"])
        self.steps = int(state["steps"])
        self._step_t.fill_(self.steps)
        self.below = np.asarray(state["below"], dtype=np.int64)
        self.flops_per_step = list(state["flops_per_step"])

    # ----------------------------------------------------------------- accounting
    def forward_flops(self) -> int:
        """Forward FLOPs per example of the live (partly compacted) model, gates as in eval."""
        return forward_flops(self.gated, state_of(self.gated).example)

    def training_flops_ratio(self) -> float:
        """Cumulative forward FLOPs of the steps so far over dense training's."""
        return sum(self.flops_per_step) / max(self.dense_flops * len(self.flops_per_step), 1)
