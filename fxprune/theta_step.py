"""The theta optimizer: projected SGD on the flat theta buffer, with mixed precision.

One step is ``theta <- clip(theta - lr g, 0, 1)`` on the gradient the loss gave theta
(averaged over processes, so every rank takes the same step), with the budget
controller's correction added (:class:`fxprune.budget.BudgetController`). Nothing in it
synchronises with the host: a non-finite gradient is remembered on the device and
reported at the next pruning check (:meth:`ThetaStep.raise_if_nonfinite`).

With a ``torch.amp.GradScaler`` theta's gradient is unscaled by a hook on theta with the
scale the backward used, and a step the scaler skips (an overflow) is skipped here too.

Example::

    >>> step = ThetaStep(pruner.config, optimizer, None, pruner.budget)
    >>> step.follow(pruner.theta, 0)           # after a move or a removal: the new tensor
    >>> step(pruner.theta, 0, None)            # after optimizer.step(): no gradient yet, no step
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from .budget import BudgetController
from .config import PruneConfig

__all__ = ["ThetaStep"]


class ThetaStep:
    """The theta update of a Pruner (see the module's docstring)."""

    def __init__(self, config: PruneConfig, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 budget: BudgetController) -> None:
        self.config, self.optimizer, self.scaler, self.budget = config, optimizer, scaler, budget
        self._device: torch.device | None = None
        self._hooked: Tensor | None = None

    def follow(self, theta: Tensor, steps: int) -> None:
        """Device counters, and the unscaling hook, on the current theta tensor."""
        if theta.device != self._device:
            self._device = theta.device
            self.step_t = torch.full((), steps, dtype=torch.long, device=theta.device)
            self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=theta.device)
            self._used_scale = torch.ones((), device=theta.device)
        if self.scaler is not None and self._hooked is not theta:
            theta.register_hook(self._unscale)
            self._hooked = theta

    def _unscale(self, grad: Tensor) -> Tensor:
        """Theta's gradient without the loss scale the backward used (GradScaler)."""
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None and self.scaler.is_enabled() else None
        if scale is None:
            return grad
        self._used_scale = scale.detach().clone()
        return grad / scale.to(grad.dtype)

    def scaler_skipped(self) -> Tensor | None:
        """True (a device tensor) when the scaler skipped this step's optimizer step; None
        without a scaler."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
            return None
        found = scaler._per_optimizer_states.get(id(self.optimizer), {}).get("found_inf_per_device", {})
        if found:  # step() called before scaler.update()
            return sum(v.to(self._device) for v in found.values()) > 0
        return scaler._scale.to(self._device) < self._used_scale  # after update(): the scale backed off

    @torch.no_grad()
    def __call__(self, theta: Tensor, steps: int, skipped: Tensor | None) -> None:
        """One projected step on ``theta`` from its gradient (cleared after), at ``steps``.
        ``skipped``: :meth:`scaler_skipped`'s answer (the caller has already returned
        when it is True)."""
        grad = theta.grad
        if grad is not None:
            grad = distributed.average_(grad)  # every process takes the same theta step
            finite = torch.isfinite(grad)
            if skipped is None:  # without a scaler a non-finite gradient is an error, reported at the check
                first = (self.first_nonfinite < 0) & ~finite.all()
                self.first_nonfinite.copy_(torch.where(first, self.step_t, self.first_nonfinite))
            else:  # a step the scaler took: its gradient is finite (an overflow skips before this)
                finite = finite & finite.all()
            step_ = self.config.theta_lr * torch.where(finite, grad, 0.0)
            if self.budget:  # the expected cost tracks the scheduled target
                step_ = self.budget.corrected(theta, step_, self.config.theta_lr, steps)
            theta.sub_(step_).clamp_(0.0, 1.0)
            theta.grad = None
        self.step_t.add_(1)

    def raise_if_nonfinite(self) -> None:
        """Raise ``FloatingPointError`` if a theta gradient was not finite since the last
        call (reads the device: at a check)."""
        first = int(self.first_nonfinite)
        if first >= 0:
            self.first_nonfinite.fill_(-1)  # said once: training that goes on finite removes again
            raise FloatingPointError(
                f"the theta gradient was not finite at step {first}: the loss diverged; "
                "lower the weight learning rate or gamma")
