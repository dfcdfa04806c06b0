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

import logging
import warnings
import weakref

import numpy as np
import torch
from torch import Tensor, fx

from . import distributed, live_compaction, optim_state
from .budget import BudgetController
from .config import PruneConfig
from .cost import forward_flops
from .cut import DECIDED, TOLERANCE, closest_to_budget, undecided
from .decisions import decisions_record
from .live_compaction import describe_removal
from .objective import Objective
from .shaping import Shaper
from .state import gate_bank, state_of

__all__ = ["Pruner", "describe_removal", "PREPARE_TIME"]

log = logging.getLogger("fxprune")


#: the PruneConfig fields ``prepare`` builds the gates with: a Pruner's config must agree on them
PREPARE_TIME = ("structures", "theta_init", "estimator", "exclude", "min_units", "min_share")
#: the ``gm.meta`` key of the (weak) reference to the gated model's Pruner
_PRUNER_META = "fxprune_pruner"
#: steps after which a loop that never adds penalty() or never calls step() is warned about
_NAG_AFTER = 20


class Pruner:
    """Learns the gates of ``gated`` next to the user's ``optimizer`` and removes
    structures during training. ``config`` defaults to the one given to ``prepare``; one
    given must agree with it on the fields the gates were built with (``PREPARE_TIME``).

    With mixed precision, pass the ``torch.amp.GradScaler`` as ``scaler``: theta
    gradients are unscaled with the scale the backward used, and the theta update is
    skipped on a step the scaler skips (an overflow). The optimizer must hold the gated
    model's trainable parameters (an error names any it misses); an optimizer
    ``weight_decay`` on them, a loop that never adds ``penalty()`` and a loop that never
    calls ``step()`` are warned about. Removals are logged (logger ``"fxprune"``) by
    layer name."""

    def __init__(self, gated: fx.GraphModule, optimizer: torch.optim.Optimizer, config: PruneConfig | None = None,
                 *, scaler: torch.amp.GradScaler | None = None) -> None:
        state = state_of(gated)
        other = gated.meta.get(_PRUNER_META)
        if other is not None and other() is not None:
            raise RuntimeError("this gated model already has a Pruner: one Pruner learns its gates and removes its "
                               "structures (two would slice the model and the optimizer twice); use that one, or "
                               "prepare the model again for a second run")
        self.gated, self.optimizer, self.scaler = gated, optimizer, scaler
        if config is not None:
            for name in PREPARE_TIME:  # the gates were built with these: another value would not be what runs
                given, prepared = getattr(config, name), getattr(state.config, name)
                if given != prepared:
                    raise ValueError(f"Pruner got PruneConfig({name}={given!r}), but the model was prepared with "
                                     f"{prepared!r}: {name} is fixed when the gates are built; prepare the model with "
                                     "this config, or leave config out to use the prepared one")
        self.config = config or state.config
        if not state.layout.size:
            reasons = sorted({g.frozen[0] for g in state.graph.groups.values() if g.frozen})[:5]
            raise ValueError(
                "the model has no prunable structure: every channel group is frozen and there is no residual "
                f"branch (reasons: {'; '.join(reasons)})")
        optim_state.check_optimizer(optimizer)
        distributed.check_shardable(gated)
        optim_state.check_holds(optimizer, gated, self.config.lam1)
        gate_bank(gated).theta.requires_grad_(True)
        decoupled = self.config.prior_decay == "decoupled" or (
            self.config.prior_decay == "auto" and not isinstance(optimizer, torch.optim.SGD))
        self.objective = Objective(gated, self.config, decoupled=decoupled)
        self.shaper = Shaper(gated, self.config.multiple_of, self.config.uniform)
        self.steps = 0
        #: consecutive checks each flat theta entry has been switched off
        self.below = np.zeros(state.layout.size, dtype=np.int64)
        #: forward FLOPs per example of the live model, one entry per step
        self.flops_per_step: list[int] = []
        #: every live removal so far (:class:`fxprune.live_compaction.Removal`)
        self.removals: list[live_compaction.Removal] = []
        #: the analysis and gate layout of the model before any removal
        self.dense_graph, self.dense_layout = state.graph, state.layout
        self.dense_flops = self.objective.dense_flops
        self._flops = self.dense_flops
        #: the budgets: their target schedule, multipliers and the correction of the theta step
        self.budget = BudgetController(self.config, self.objective)
        self._warmup = self.config.warmup_steps()
        self._check_every = self.config.check_steps()
        self._decide = self.config.decide_step() if self.config.targets or self.config.decide else 0
        self._penalties = self._without_penalty = 0
        #: at the decision: the share of gates left undecided, and the decided model's relative miss of its budget
        self.undecided_at_decision: float | None = None
        self.budget_miss = 0.0
        self._warned, self._hooked, self._device = set(), None, None  # warned kinds, theta hook, device
        self._pick_sentinel()
        self._follow_device()
        gated.meta[_PRUNER_META] = weakref.ref(self)
        #: optimizer steps since the last pruner.step() (a loop that never calls it is warned about)
        self._optimizer_steps = 0
        me = weakref.ref(self)
        self._hook = optimizer.register_step_post_hook(lambda *_: (p := me()) is not None and p._optimizer_stepped())
        if decoupled:  # the prior decays the weights before the optimizer's update, as AdamW does
            self._decay_hook = optimizer.register_step_pre_hook(lambda *_: (p := me()) is not None and p.objective.decay_(optimizer))

    # ----------------------------------------------------------------- training loop
    @property
    def theta(self) -> Tensor:
        """Every theta, in one flat buffer (``fxprune.state.state_of(gated).layout`` says where)."""
        return gate_bank(self.gated).theta

    def _follow_device(self) -> None:
        """Device counters, and the unscaling hook, on the current theta (after a move
        or a removal the model holds a new theta tensor)."""
        theta = self.theta
        if theta.device != self._device:
            self._device = theta.device
            self._step_t = torch.full((), self.steps, dtype=torch.long, device=theta.device)
            self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=theta.device)
            self._used_scale = torch.ones((), device=theta.device)
            self.budget.to(theta.device)
            gate_bank(self.gated).generator = distributed.rank_generator(theta.device)
        if self.scaler is not None and self._hooked is not theta:
            theta.register_hook(self._unscale)
            self._hooked = theta

    def _unscale(self, grad: Tensor) -> Tensor:
        """Theta's gradient without the loss scale the backward used (GradScaler)."""
        scale = getattr(self.scaler, "_scale", None) if self.scaler.is_enabled() else None
        if scale is None:
            return grad
        self._used_scale = scale.detach().clone()
        return grad / scale.to(grad.dtype)

    def _scaler_skipped(self) -> Tensor | None:
        """True (a device tensor) when the scaler skipped this step's optimizer step."""
        if self.scaler is None or not self.scaler.is_enabled() or getattr(self.scaler, "_scale", None) is None:
            return None
        found = self.scaler._per_optimizer_states.get(id(self.optimizer), {}).get("found_inf_per_device", {})
        if found:  # step() called before scaler.update()
            return sum(v.to(self._device) for v in found.values()) > 0
        return self.scaler._scale.to(self._device) < self._used_scale  # after update(): the scale backed off

    def penalty(self) -> Tensor:
        """GSM prior plus ``gamma * C(theta)``; add it to the task loss."""
        theta = self.theta
        if theta.grad is not None and self._sentinel is not None and self._sentinel.grad is None:
            theta.grad = None  # the model's gradients were cleared since theta's accrued (a skipped batch): so are its
        self._penalties += 1
        self._follow_device()
        if self.budget:  # the cost's pull on theta is the controller's (step()); the value is reported
            return self.objective.penalty(gamma=0.0) + self.budget.penalty_value(self.steps).to(theta.dtype)
        return self.objective.penalty(self.gamma())

    @property
    def multipliers(self) -> dict[str, Tensor]:
        """The budgets' Lagrange multipliers (:class:`fxprune.budget.BudgetController`)."""
        return self.budget.multipliers

    def targets(self) -> dict[str, float]:
        """The budgets at this step: after the warm-up, each target falls from 1 to its
        final value over ``budget_steps`` (a cubic schedule: fast at first, gently at the
        end), then stays."""
        return self.budget.targets(self.steps)

    def _pick_sentinel(self) -> None:
        #: a trainable parameter of the model (picked again after a removal, which may delete it): its
        #: gradient cleared says the user's zero_grad ran
        self._sentinel = next((p for p in self.gated.parameters() if p.requires_grad), None)

    def _optimizer_stepped(self) -> None:
        self._optimizer_steps += 1
        if self._optimizer_steps == _NAG_AFTER:
            self._warn("step", f"optimizer.step() ran {_NAG_AFTER} times without pruner.step(): call pruner.step() "
                               "after optimizer.step(), or the gates never learn nor remove anything")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def gamma(self) -> float:
        """The cost strength at this step: ``gamma``, ramped linearly over ``warmup`` steps."""
        return self.config.gamma * self.budget.ramp(self.steps)

    def report(self) -> dict[str, float]:
        """Where training stands (reads the device: call it at a check, not every step):
        the step, the expected FLOPs and parameter fractions, and each budget's multiplier
        (or the strength ``gamma``); after the decision, the share of gates it found
        undecided (``undecided_at_decision``: a schedule that did not separate them) and
        the decided model's relative miss of its budget (``budget_miss``)."""
        with torch.no_grad():
            fractions = {k: float(v) for k, v in self.objective.fractions().items()}
        out = {"step": self.steps, "flops": fractions["flops"], "params": fractions["params"]}
        if self.multipliers:
            out.update({f"multiplier_{k}": float(m) for k, m in self.multipliers.items()})
        else:
            out["gamma"] = self.gamma()
        if self.undecided_at_decision is not None:
            out["undecided_at_decision"] = self.undecided_at_decision
            out["budget_miss"] = self.budget_miss
        return out

    @torch.no_grad()
    def step(self) -> live_compaction.Removal | None:
        """Projected SGD on theta; every ``check_every`` steps, the pruning check.
        Returns what was removed at this step, if anything."""
        if self.steps == 0:  # before the first collective: one config on every process
            distributed.same_config(self.config)
        self._without_penalty = self._without_penalty + 1 if not self._penalties else 0
        self._penalties = self._optimizer_steps = 0
        skipped = self._scaler_skipped()
        if skipped is not None and bool(skipped):  # the scaler skipped the optimizer's step: so does the pruner's
            self.theta.grad = None  # (GradScaler.step reads its overflow flag on the host already)
            return None
        if self._without_penalty == _NAG_AFTER:
            self._warn("penalty", f"pruner.penalty() has not been added to the loss for {_NAG_AFTER} steps: without it "
                                  "nothing pays for the structures, and the weight prior is missing")
        self._follow_device()
        theta = self.theta
        grad = theta.grad
        fixed = bool(self._decide) and self.steps + 1 >= self._decide
        if fixed:  # the gates are (being) decided: no theta step, no dual step
            theta.grad = None
            grad = None
        if grad is not None:
            grad = distributed.average_(grad)  # every process takes the same theta step
            finite = torch.isfinite(grad)
            if skipped is None:  # without a scaler a non-finite gradient is an error, reported at the check
                first = (self._first_nonfinite < 0) & ~finite.all()
                self._first_nonfinite.copy_(torch.where(first, self._step_t, self._first_nonfinite))
            else:  # a step the scaler took: its gradient is finite (an overflow skips above)
                finite = finite & finite.all()
            step_ = self.config.theta_lr * torch.where(finite, grad, 0.0)
            if self.budget:  # the expected cost tracks the scheduled target
                step_ = self.budget.corrected(theta, step_, self.config.theta_lr, self.steps)
            theta.sub_(step_).clamp_(0.0, 1.0)
            theta.grad = None
        self._step_t.add_(1)
        self.steps += 1
        self.flops_per_step.append(self._flops)
        if self.steps == self._decide:
            return self._decide_gates()
        return self.check() if self.steps % self._check_every == 0 else None

    @property
    def decided(self) -> bool:
        """Whether the gates have been decided (``PruneConfig.decide``): every theta is 0 or 1
        and stays; training goes on as fine-tuning of the model eval mode computes."""
        return bool(self._decide) and self.steps >= self._decide

    def _decide_gates(self) -> live_compaction.Removal | None:
        """Round every theta to what eval mode keeps, and remove the rest now; training
        stops sampling masks. Under a budget, when that rounding misses it by more than
        :data:`fxprune.cut.TOLERANCE`, the structures of highest theta closest to it are
        kept instead (:func:`fxprune.cut.closest_to_budget`); otherwise eval mode computes
        the same function before and after."""
        bank = gate_bank(self.gated)
        keep = self.shaper(bank.deterministic(), bank.theta, "mean")
        self.undecided_at_decision = undecided(bank.theta.detach())
        if self.undecided_at_decision > 0.01:
            log.warning("step %d: %.1f%% of the gates are undecided (theta in (%g, %g)) at the decision: the budget's "
                        "schedule did not separate them; the decision rounds them", self.steps,
                        100 * self.undecided_at_decision, DECIDED, 1 - DECIDED)
        if self.multipliers:
            cut, rounded, miss = closest_to_budget(self.objective, bank, keep, self.config.targets,
                                                   lambda k: self.shaper(k, bank.theta, "mean"))
            if cut is not keep:
                log.info("step %d: rounding at 0.5 misses the budget by %.1f%%; the %d structures of highest theta "
                         "that fit miss it by %.1f%%", self.steps, 100 * rounded, int(cut.sum()), 100 * miss)
            self.budget_miss = miss
            if miss > TOLERANCE:
                self._warn("budget", f"the decision at step {self.steps} misses the budget {self.config.targets} by "
                                     f"{100 * miss:.1f}% (relative): reaching it would cut structures training kept; "
                                     "train longer (total_steps), or give a looser budget")
            keep = cut
        self.theta.copy_(keep)
        log.info("step %d: gates decided, %d of %d kept", self.steps, int(self.theta.sum()), self.theta.numel())
        off = (self.theta <= self.config.theta_tol).cpu().numpy()
        self.below = np.where(off, np.maximum(self.below, self.config.patience - 1), self.below)
        return self.check()

    # ----------------------------------------------------------------- pruning conditions
    @torch.no_grad()
    def check(self) -> live_compaction.Removal | None:
        """Apply the pruning conditions and remove what meets them (reads the thetas and
        weight norms once: the only host synchronisation of training)."""
        first = int(self._first_nonfinite)
        if first >= 0:
            self._first_nonfinite.fill_(-1)  # said once: training that goes on finite removes again
            raise FloatingPointError(
                f"the theta gradient was not finite at step {first}: the loss diverged; "
                "lower the weight learning rate or gamma")
        c, obj = self.config, self.objective
        distributed.same_everywhere(self.theta.detach(), "thetas")
        if log.isEnabledFor(logging.INFO):
            log.info("step %d: %s", self.steps, ", ".join(f"{k} {v:.4g}" for k, v in self.report().items() if k != "step"))
        state = state_of(self.gated)
        per_weight, per_structure = obj.squared_norms()
        theta = self.theta.detach().cpu().numpy()
        sq, elems = per_structure.cpu().numpy(), obj.elems.cpu().numpy()
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
            sizes = np.array([w.numel() for w in obj.weights], dtype=float)
            inside = np.zeros(len(sizes), dtype=bool)
            layer_w, layer_s = obj._layer_w.cpu().numpy(), obj._layer_s.cpu().numpy()
            inside[layer_w[off[layer_s]]] = True
            outside = ~inside if (~inside).any() else np.ones_like(inside)
            ref[list(state.layout.layers.values())] = np.sqrt(w_sq[outside].sum() / max(sizes[outside].sum(), 1))
        drop = ripe & (rms <= c.w_tol * ref) if c.w_tol is not None else ripe
        drop &= ~(gate_bank(self.gated).deterministic().cpu().numpy() > 0)  # what eval mode keeps stays anyway
        if distributed.active():  # rank 0 decides for every process
            masks = distributed.broadcast_(torch.as_tensor(np.stack([drop, ripe])).to(torch.uint8)).numpy().astype(bool)
            drop, ripe = masks[0], masks[1]
        if not ripe.any():
            return None
        if c.reset_moments:  # once, at the check that first finds it ripe: later momentum is the prior's pull
            self._reset_moments(ripe & ~drop & (self.below == c.patience))
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
        structure would never reach the weight condition. Done once per switch-off: the
        momentum built afterwards is that pull's own, and zeroing it again slows it."""
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
        distributed.require_wrapper(self.gated)
        before = state_of(self.gated).graph
        record = live_compaction.remove(self.gated, unit_drop, layer_drop, self.optimizer, verify=verify,
                                        shape=(lambda k, t: self.shaper(k, t, "max")) if self.shaper and verify else None)
        record.step = self.steps
        self.below = self.below[record.extra.pop("kept")]
        self.objective.rebuild()
        self._pick_sentinel()
        self._follow_device()
        self._flops = record.flops
        self.removals.append(record)
        log.info("step %d: %s; forward FLOPs per example %d (%.1f%% of dense)", self.steps,
                 describe_removal(before, record), record.flops, 100 * record.flops / max(self.dense_flops, 1))
        return record

    def decisions(self) -> dict:
        """What the gates decided, over the units the model was prepared with (removed units
        and those whose theta is below 0.5 both count as dropped): save it with
        :func:`fxprune.decisions.save_decisions`, re-apply it to a fresh copy of the model
        with :func:`fxprune.decisions.apply_decisions`."""
        return decisions_record(self.gated, self)

    def widths(self) -> list[tuple[str, int, int]]:
        """``(layer, output channels before training, now)`` of every conv and linear layer
        (now 0: the layer was removed with its branch)."""
        now = state_of(self.gated).graph
        current = {owner: now.spaces[s].size for owner, s in now.layer_outputs if s in now.spaces}
        seen, rows = set(), []
        for owner, s in self.dense_graph.layer_outputs:
            if owner not in seen:
                seen.add(owner)
                rows.append((owner, self.dense_graph.spaces[s].size, current.get(owner, 0)))
        return rows

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Steps, patience counters, FLOPs history and every removal with its keep masks:
        with the model's and optimizer's state dicts, enough to resume exactly."""
        return {
            "steps": self.steps,
            "below": self.below.tolist(),
            "flops_per_step": list(self.flops_per_step),
            "multipliers": self.budget.state_dict(),
            "removals": [{"step": r.step, "units": dict(r.units), "layers": list(r.layers), "flops": r.flops,
                          "keep": {g: list(k) for g, k in r.keep.items()}} for r in self.removals],
        }

    def require_fresh(self) -> None:
        """Raise unless nothing has been trained or removed yet (where a checkpoint loads)."""
        if self.removals or self.steps:
            raise RuntimeError(
                "Pruner.load_state_dict needs a fresh pruner: build the gated model, optimizer and Pruner "
                "again as at the start of training, then load the checkpoint")

    def load_state_dict(self, state: dict) -> None:
        """Replay the saved removals on this pruner's freshly prepared model and optimizer
        (so parameter and optimizer shapes match the checkpoint), then restore the counters.
        Load the model's and the optimizer's state dicts after this."""
        self.require_fresh()
        for saved in state["removals"]:
            keep = {int(g): np.asarray(k, dtype=bool) for g, k in saved["keep"].items()}
            record = self.remove({g: ~k for g, k in keep.items()}, set(saved["layers"]), verify=False)
            record.step = int(saved["step"])
        self.steps = int(state["steps"])
        self.budget.load_state_dict(state.get("multipliers", {}))
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
