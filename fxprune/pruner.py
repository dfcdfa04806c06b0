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

The Pruner composes parts with one job each: the budget controller
(:class:`fxprune.budget.BudgetController`), the theta optimizer
(:class:`fxprune.theta_step.ThetaStep`), the pruning check
(:class:`fxprune.check.PruningCheck`), and the removal and its record; what it derives
from the model (the objective's indices, the check's counters, the live FLOPs) follows
the state's version, so a removal made outside it (``live_compaction.remove``) is
followed too. ``pruner.on_removal(fn)`` calls ``fn(record)`` inside every removal's
transaction.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx

from . import distributed, live_compaction, optim_state, resume
from .budget import BudgetController
from .check import PruningCheck
from .config import PruneConfig
from .cost import forward_flops
from .cut import TOLERANCE, decide
from .decisions import decisions_record
from .followers import follow_copy
from .live_compaction import describe_removal
from .objective import Objective
from .shaping import Shaper
from .state import PRUNER, Removal, gate_bank, state_of
from .theta_step import ThetaStep

__all__ = ["Pruner", "describe_removal", "PREPARE_TIME"]

log = logging.getLogger("fxprune")


#: the PruneConfig fields ``prepare`` builds the gates with: a Pruner's config must agree on them
PREPARE_TIME = ("structures", "theta_init", "estimator", "exclude", "min_units", "min_share")
_PRUNER_META = PRUNER
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
        #: the optimizer that holds the state (a wrapper's ``.optimizer``: accelerate's AcceleratedOptimizer)
        optimizer = optim_state.unwrap(optimizer)
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
        distributed.check_shardable(gated)
        distributed.check_forward(gated)
        optim_state.check_holds(optimizer, gated, self.config.lam1)
        gate_bank(gated).theta.requires_grad_(True)
        decoupled = self.config.prior_decay == "decoupled" or (
            self.config.prior_decay == "auto" and not isinstance(optimizer, torch.optim.SGD))
        self.objective = Objective(gated, self.config, decoupled=decoupled)
        self.shaper = Shaper(gated, self.config.multiple_of, self.config.uniform)
        self.steps = 0
        #: the pruning conditions and their per-entry counters
        self.pruning = PruningCheck(self.config, state.layout.size)
        #: the analysis and gate layout of the model before any removal
        self.dense_graph, self.dense_layout = state.dense_graph or state.graph, state.dense_layout or state.layout
        self.dense_flops = self.objective.dense_flops
        #: forward FLOPs per example of the live model summed over the steps trained
        self.trained_flops = 0
        #: the budgets: their target schedule, multipliers and the correction of the theta step
        self.budget = BudgetController(self.config, self.objective)
        #: the theta optimizer
        self.theta_step = ThetaStep(self.config, optimizer, scaler, self.budget)
        self._version = state.version
        self._hooks: list[Callable[[Removal], Any]] = []
        self._warmup = self.config.warmup_steps()
        self._check_every = self.config.check_steps()
        self._decide = self.config.decide_step() if self.config.targets or self.config.decide else 0
        self._penalties = self._without_penalty = 0
        #: at the decision: the share of gates left undecided, and the decided model's relative miss of its budget
        self.undecided_at_decision: float | None = None
        self.budget_miss = 0.0
        self._warned, self._device = set(), None
        self._pick_sentinel()
        self._follow()
        gated.meta[_PRUNER_META] = weakref.ref(self)
        #: optimizer steps since the last pruner.step() (a loop that never calls it is warned about)
        self._optimizer_steps = 0
        me = weakref.ref(self)
        self._hook = optimizer.register_step_post_hook(lambda *_: None if (p := me()) is None else p._optimizer_stepped())
        if decoupled:  # the prior decays the weights before the optimizer's update, as AdamW does
            self._decay_hook = optimizer.register_step_pre_hook(lambda *_: (p := me()) is not None and p.objective.decay_(optimizer))
        if state.pending_pruner is not None:  # a state dict loaded into the model before this Pruner was built
            pending, state.pending_pruner = state.pending_pruner, None
            self.load_state_dict(pending)

    # ----------------------------------------------------------------- training loop
    @property
    def theta(self) -> Tensor:
        """Every theta, in one flat buffer (``fxprune.state.state_of(gated).layout`` says where)."""
        return gate_bank(self.gated).theta

    @property
    def removals(self) -> list[Removal]:
        """Every live removal of the model so far (the state's records)."""
        return state_of(self.gated).removals

    @property
    def below(self) -> np.ndarray:
        """Consecutive checks each flat theta entry has been switched off."""
        self._follow()
        return self.pruning.below

    @property
    def live_flops(self) -> float:
        """Forward FLOPs per example of the live model (the last removal's record, or dense)."""
        removals = self.removals
        return removals[-1].flops if removals else self.dense_flops

    def _follow(self) -> None:
        """Follow the model: removals made since the last call (the state's records, in
        order), and the device the thetas are on."""
        state = state_of(self.gated)
        if state.version != self._version:
            for record in state.removals[self._version:state.version]:
                self.pruning.follow(record)
            self._version = state.version
            self._pick_sentinel()
        theta = self.theta
        if theta.device != self._device:
            self._device = theta.device
            self.budget.to(theta.device)
            gate_bank(self.gated).generator = distributed.rank_generator(theta.device)
        self.theta_step.follow(theta, self.steps)

    def on_removal(self, fn: Callable[[Removal], Any]) -> Callable[[Removal], Any]:
        """Call ``fn(record)`` after every live removal, inside its transaction (an
        exception in ``fn`` undoes the removal and propagates; ``fn`` may return a callable
        that undoes its own work, called when a later follower fails). Returns ``fn``."""
        self._hooks.append(fn)
        return fn

    def follow(self, holder: Any) -> Any:
        """Keep ``holder.module``, a copy of the gated model (``AveragedModel``, timm's ``ModelEmaV3``,
        a teacher), in step with every live removal (:mod:`fxprune.followers`). Returns ``holder``."""
        self.on_removal(follow_copy(holder, self.gated))
        return holder

    def penalty(self) -> Tensor:
        """GSM prior plus ``gamma * C(theta)``; add it to the task loss."""
        theta = self.theta
        if theta.grad is not None and self._sentinel is not None and self._sentinel.grad is None:
            theta.grad = None  # the model's gradients were cleared since theta's accrued (a skipped batch): so are its
        self._penalties += 1
        self._follow()
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
    def step(self) -> Removal | None:
        """Projected SGD on theta; every ``check_every`` steps, the pruning check.
        Returns what was removed at this step, if anything."""
        if self.steps == 0:  # before the first collective: one config on every process
            distributed.same_config(self.config)
        self._without_penalty = self._without_penalty + 1 if not self._penalties else 0
        self._penalties = self._optimizer_steps = 0
        self._follow()
        skipped = self.theta_step.scaler_skipped()
        if skipped is not None and bool(skipped):  # the scaler skipped the optimizer's step: so does the pruner's
            self.theta.grad = None  # (GradScaler.step reads its overflow flag on the host already)
            return None
        if self._without_penalty == _NAG_AFTER:
            self._warn("penalty", f"pruner.penalty() has not been added to the loss for {_NAG_AFTER} steps: without it "
                                  "nothing pays for the structures, and the weight prior is missing")
        theta = self.theta
        if bool(self._decide) and self.steps + 1 >= self._decide:  # the gates are (being) decided: no theta step
            theta.grad = None
        self.theta_step(theta, self.steps, skipped)
        self.steps += 1
        self.trained_flops += self.live_flops
        if self.steps == self._decide:
            return self._decide_gates()
        return self.check() if self.steps % self._check_every == 0 else None

    @property
    def decided(self) -> bool:
        """Whether the gates have been decided (``PruneConfig.decide``): every theta is 0 or 1
        and stays; training goes on as fine-tuning of the model eval mode computes."""
        return bool(self._decide) and self.steps >= self._decide

    def _decide_gates(self) -> Removal | None:
        """Round every theta to what eval mode keeps, and remove the rest now; training
        stops sampling masks. Under a budget, when that rounding misses it by more than
        :data:`fxprune.cut.TOLERANCE`, the structures of highest theta closest to it are
        kept instead (:func:`fxprune.cut.closest_to_budget`); otherwise eval mode computes
        the same function before and after."""
        bank = gate_bank(self.gated)
        keep, self.undecided_at_decision, self.budget_miss = decide(
            self.objective, bank, lambda k: self.shaper(k, bank.theta, "mean"), self.config.targets, self.steps)
        if self.budget_miss > TOLERANCE:
            self._warn("budget", f"the decision at step {self.steps} misses the budget {self.config.targets} by "
                                 f"{100 * self.budget_miss:.1f}% (relative): reaching it would cut structures training "
                                 "kept; train longer (total_steps), or give a looser budget")
        self.theta.copy_(keep)
        log.info("step %d: gates decided, %d of %d kept", self.steps, int(self.theta.sum()), self.theta.numel())
        self.pruning.decided(self.theta)
        return self.check()

    # ----------------------------------------------------------------- pruning conditions
    @torch.no_grad()
    def check(self) -> Removal | None:
        """Apply the pruning conditions and remove what meets them (reads the thetas and
        weight norms once: the only host synchronisation of training)."""
        self._follow()
        self.theta_step.raise_if_nonfinite()
        distributed.same_everywhere(self.theta.detach(), "thetas")
        if log.isEnabledFor(logging.INFO):
            log.info("step %d: %s", self.steps, ", ".join(f"{k} {v:.4g}" for k, v in self.report().items() if k != "step"))
        drop = self.pruning(self.gated, self.objective, self.optimizer)
        return self.remove(*drop) if drop is not None else None

    # ----------------------------------------------------------------- live removal
    def remove(self, unit_drop: dict[int, np.ndarray], layer_drop: set[int],
               verify: bool = True, *, step: int | None = None) -> Removal:
        """Remove units (``unit_drop[group]``: True = remove) and branches from the live
        model and its optimizer (:func:`fxprune.live_compaction.remove`), all or nothing:
        the model, the optimizer, this pruner's counters and whatever :meth:`on_removal`
        hooks follow. ``step``: the step to record (default: this one)."""
        distributed.require_wrapper(self.gated)
        self._follow()
        before = state_of(self.gated).graph
        saved = (self.pruning.below, self._version, self._sentinel)

        def follow(record: Removal) -> None:  # inside the transaction: a cache that cannot follow undoes it
            self._follow()
            self.objective.sync()
        try:
            record = live_compaction.remove(
                self.gated, unit_drop, layer_drop, self.optimizer, verify=verify, step=self.steps if step is None else step,
                shape=(lambda k, t: self.shaper(k, t, "max")) if self.shaper and verify else None,
                followers=[follow, *self._hooks])
        except BaseException:
            self.pruning.below, self._version, self._sentinel = saved
            raise
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
        """Steps, patience counters, FLOPs trained, multipliers and every removal with its keep
        masks: with the model's and optimizer's state dicts, enough to resume exactly (the
        gated model's own state dict carries it too: :mod:`fxprune.resume`)."""
        return resume.pruner_state(self)

    def require_fresh(self, saved: list[dict] | None = None, steps: int = 0) -> None:
        """Raise unless nothing has been trained (but ``steps``) nor removed but the first of
        the ``saved`` removals: where a checkpoint loads."""
        resume.require_fresh(self, saved, steps)

    def load_state_dict(self, state: dict) -> None:
        """Replay the saved removals this model has not had yet (so parameter and optimizer
        shapes match the checkpoint), then restore the counters. Load the optimizer's state
        dict after this; the model's, before or after."""
        resume.load_pruner_state(self, state)

    # ----------------------------------------------------------------- accounting
    def forward_flops(self) -> int:
        """Forward FLOPs per example of the live (partly compacted) model, gates as in eval."""
        return forward_flops(self.gated, state_of(self.gated).example)

    def training_flops_ratio(self) -> float:
        """Cumulative forward FLOPs of the steps so far over dense training's."""
        return self.trained_flops / max(self.dense_flops * self.steps, 1)
