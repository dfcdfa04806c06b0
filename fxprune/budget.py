"""The budget controller: the target schedule, the Lagrange multipliers, and a theta step
whose expected cost follows the scheduled target (method.md section 2, "budgets").

After the warm-up each budget's target falls from 1 to its value over ``budget_steps``
(a cubic: fast first, gently at the end). Dual ascent on a multiplier lags that
schedule: a multiplier that starts at 1 needs tens of steps to grow to the strength at
which the cost's gradient outweighs the data's, and on a model with thousands of units
(each a fraction of a per mille of the FLOPs) nothing moved until the schedule was over
(torchvision's resnet18: no removal before the decision, then one cut of its stem).

So the controller sets the strength at every step instead. To the theta step the data
gradient and the weight prior ask for, ``clip(theta - lr g)``, it adds the cost direction
``dF/dtheta`` scaled by the factor that brings the expected cost to the next step's
target: a push down when the plain step would leave the cost above it, a pull up when
below (found on a log-spaced grid of candidates refined three times, each one batched
evaluation of the exact cost polynomial, on the device: no host synchronisation). That
factor over ``lr`` is the multiplier of the step: the strength ``lambda`` for which
``g + lambda dF/dtheta`` is the step taken, negative when it pulls up. With
``PruneConfig.pressure="uniform"`` (the default) the direction is 1 on every gate whose
removal saves cost instead of ``dF/dtheta`` (``lambda`` is then a price per gate), so the
structures whose data gradient is weakest go first and the budget decides how many: the
structure is learnt, while the expected cost is on the schedule at every step after the
warm-up. The penalty carries the cost term's value, not its gradient:
the pull on theta is this step's, and the task loss's scale is left alone.

Example::

    >>> controller = BudgetController(pruner.config, pruner.objective)
    >>> controller.targets(0)                  # at the start: the dense cost
    {'flops': 1.0}
    >>> theta = gate_bank(gated).theta.detach()
    >>> step_ = controller.corrected(theta, 0.1 * torch.zeros_like(theta), 0.1, 50)   # the theta step to take
    >>> step_.shape == theta.shape
    True
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .config import PruneConfig
from .objective import Objective

__all__ = ["BudgetController"]

#: the correction's size is searched on a grid of this many candidates, refined this many times (one
#: batched evaluation of the cost polynomial each): to 2 / 15^3 of its log-spaced range, about 2 %
#: of the step's own size, and never over the target (the candidate taken is the first that meets it)
_CANDIDATES, _LEVELS = 16, 3
#: the separation's push at the decision, times 1 / (decide - reached): 8 moves a theta at 0 or 1 by 1 by the
#: middle of that phase. With 2 (by 1 at its end) the data gradient's noise held a third of a 4-layer Llama's
#: gates undecided under uniform pressure (0.6 % with 8, 0.2 % with 32; bits per byte 3.388, 3.380, 3.372)
_SEPARATION = 8.0
#: the smallest step of the search's log scale (the costliest gate moved by a millionth)
_A_MIN = 1e-6


class BudgetController:
    """The budgets of ``config`` (``config.targets``) for the gates of ``objective``."""

    def __init__(self, config: PruneConfig, objective: Objective) -> None:
        self.config, self.objective = config, objective
        self.final = dict(config.targets)
        self.warmup = config.warmup_steps()
        self.schedule = config.schedule_steps()
        self.rate = config.budget_rate()
        self.decide = config.decide_step() if config.targets or config.decide else 0
        if self.final and config.gamma is not None:
            warnings.warn(f"PruneConfig(gamma={config.gamma:g}) is not used with a budget ({self.final}): the budget "
                          "controller sets the cost's strength at every step; drop gamma, or the budget for a fixed "
                          "strength", stacklevel=4)
        #: the budgets' Lagrange multipliers (device tensors): the strength of the last theta step's cost pull
        self.multipliers: dict[str, Tensor] = {k: torch.tensor(0.0) for k in self.final}
        #: the expected cost fractions after the last theta step (device tensors)
        self.fractions: dict[str, Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.final)

    def to(self, device: torch.device) -> None:
        self.multipliers = {k: m.to(device) for k, m in self.multipliers.items()}
        self.fractions = {k: f.to(device) for k, f in self.fractions.items()}

    # ------------------------------------------------------------------ schedule
    def targets(self, step: int) -> dict[str, float]:
        """The budgets at ``step``: 1 during the warm-up, then falling to their values over
        the schedule (``(1 - u)^3``), then staying."""
        if not self.schedule:
            return dict(self.final)
        u = min(1.0, max(0, step - self.warmup) / self.schedule)
        return {k: f + (1 - f) * (1 - u) ** 3 for k, f in self.final.items()}

    def ramp(self, step: int) -> float:
        """The warm-up's ramp of the cost strength, 0 to 1."""
        return min(1.0, step / self.warmup) if self.warmup else 1.0

    def separation(self, step: int) -> float:
        """How far a theta at 0 or 1 of ``2 theta - 1`` is pushed from 0.5 at ``step``: 0 until
        the budget is reached, then growing linearly to ``_SEPARATION / (decide - reached)``
        at the decision, so that a theta at 0 or 1 is moved by up to 1 by the middle of that
        phase (the gates separate while the controller holds the expected cost on the
        budget, and the decision finds them decided instead of rounding them)."""
        reached = self.warmup + self.schedule
        if not self.decide or step < reached or self.decide <= reached:
            return 0.0
        phase = self.decide - reached
        return _SEPARATION / phase * min(1.0, (step - reached) / phase)

    @torch.no_grad()
    def penalty_value(self, step: int) -> Tensor:
        """``sum_k multiplier_k * max(fraction_k - target_k, 0)`` at ``step``, the fractions
        those the last theta step left: the cost term's value in the objective, without a
        gradient (the controller moves theta itself)."""
        targets = self.targets(step)
        return sum((m * (self.fractions[k] - targets[k]).clamp_min(0).to(m) for k, m in self.multipliers.items()
                    if k in self.fractions), torch.zeros(()))

    # ------------------------------------------------------------------ the theta step
    @torch.no_grad()
    def corrected(self, theta: Tensor, step_: Tensor, lr: float, step: int) -> Tensor:
        """The theta step to take at ``step`` (``theta - result``, then clipped to [0, 1]):
        ``step_`` (the learning rate times the gradient) plus the cost direction of every
        budget, scaled to bring the expected cost to the next step's target: a push down
        when the plain step leaves it above, a pull up when it leaves it below (the
        sharpening and the data can sink the cost under its budget once the schedule is
        over; with two budgets, only pushes down: the binding one is met, the other stays
        under). The multipliers follow (see the module's docstring)."""
        if not theta.numel():  # every gate has been removed: there is no step to correct
            return step_
        obj, alpha = self.objective, self.objective.config.alpha
        push = self.separation(step)
        if push:  # away from 0.5, before the cost's correction: the expected cost stays on the target
            step_ = step_ - push * (2 * theta.detach() - 1)
        for k, target in self.targets(step + 1).items():
            with torch.enable_grad():
                t = theta.detach().clone().requires_grad_(True)
                grad = torch.autograd.grad(obj.fractions_at(obj.scaled_theta_of(t, alpha))[k], t)[0]
            grad = grad.to(theta.dtype).clamp_min(0)
            if self.config.pressure == "uniform":  # every gate that saves cost alike, a layer gate alpha times
                grad = torch.where(grad > 0, torch.where(obj.is_layer, alpha, 1.0).to(grad), 0.0)
            top = grad.max().clamp_min(1e-30)
            direction = grad / top  # the costliest gate moves by ``a``
            # at ``a = +-hi`` every gate with a cost reaches 0 (1): the most the direction can do
            hi = (1.0 / torch.where(direction > 0, direction, 1.0).min().clamp_min(1e-12)).clamp_min(1.0)
            span = torch.log1p(hi.to(torch.float64) / _A_MIN)

            def strength(u: Tensor) -> Tensor:  # u in [-1, 1] -> a, 0 at 0, +-hi at +-1, log-spaced
                return (u.sign() * _A_MIN * torch.expm1(u.abs() * span)).to(theta.dtype)  # noqa: B023 - used in this iteration

            def cost(a: Tensor) -> Tensor:  # the expected cost after the step with ``a`` (a batch of them)
                return obj.fractions_at((theta - step_ - a[..., None] * direction).clamp(0.0, 1.0))[k]  # noqa: B023

            one = torch.ones((), dtype=torch.float64, device=theta.device)
            goal: Tensor | float = target
            if self.rate < 1:  # budget_lr: the share of the distance to the target taken
                start = cost((0 * one).to(theta.dtype))
                goal = start - self.rate * (start - target)
            lo, hi_u = -one, one
            grid = torch.linspace(0.0, 1.0, _CANDIDATES, dtype=torch.float64, device=theta.device)
            for _ in range(_LEVELS):  # the cost falls with u: the first candidate at or under the goal
                u = lo + (hi_u - lo) * grid
                costs = cost(strength(u))
                meets = costs <= goal
                first = torch.where(meets.any(), meets.to(torch.int8).argmax(), _CANDIDATES - 1).reshape(1)
                # index_select, not u[first]: indexing with a tensor reads it on the host
                lo, hi_u = u.index_select(0, (first - 1).clamp_min(0))[0], u.index_select(0, first)[0]
            a, after = strength(hi_u), costs.index_select(0, first)[0]
            if len(self.final) > 1:  # two budgets: each only pushes down, so the binding one is met, the other under
                a = a.clamp_min(0)
                after = cost(a[None])[0]  # the cost of the step taken, which the clamp may have changed
            step_ = step_ + a * direction
            # the multiplier is the strength that made this step: the cost's gradient times it is ``a * direction``
            self.multipliers[k].copy_((a / (lr * top)).to(self.multipliers[k]))
            self.fractions[k] = after.detach()
        return step_

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, float]:
        return {k: float(m) for k, m in self.multipliers.items()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        for k, v in state.items():
            self.multipliers[k].fill_(v)
