"""One config object for the whole method (PyTorch quantization's ``QConfig`` style).

The symbols follow ``method.md``: ``gamma`` (strength of the complexity cost), ``beta``
(FLOPs versus parameters), ``alpha`` (layer versus unit balance), ``lam1`` (slab
precision = ordinary weight decay) and ``spike_ratio`` (``lam0 = spike_ratio * lam1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from .gates import ESTIMATORS

__all__ = ["PruneConfig", "CostReference", "COSTS"]

#: the cost measures ``PruneConfig.cost`` accepts
COSTS = ("complexity", "structures")


class CostReference(NamedTuple):
    """What the cost is normalised by: FLOPs per example, parameters, and gates (structures)."""

    flops: float
    params: float
    structures: float


@dataclass
class PruneConfig:
    """What to gate, the objective's knobs, and the pruning conditions.

    Attributes:
        structures: which structures get gates: ``"units"`` (channel groups),
            ``"layers"`` (residual branches) or ``"both"``.
        gamma: strength of the complexity cost: task loss traded for removing the whole cost.
        cost: what a structure costs (method.md sections 2 and 3). ``"complexity"``
            (paper C): ``C = beta E[FLOPs]/FLOPs_ref + (1 - beta) E[Params]/Params_ref``, so
            a structure's price is the FLOPs and parameters it removes, which depend on
            the widths around it. ``"structures"`` (paper A's flat hyper-prior): ``C = E[kept
            structures] / structures_ref``, the same price for every gate, whatever the
            widths around it; the final widths then no longer depend on the starting width.
        beta: in [0, 1], weight of FLOPs against parameters in the ``"complexity"`` cost.
        alpha: multiplies the cost gradient of layer gates (>1 favours removing layers).
        lam1: slab precision of the weight prior, i.e. the ordinary weight decay.
        spike_ratio: ``lam0 / lam1``, the spike precision that pulls switched-off weights to 0.
        theta_lr: learning rate of the projected SGD on theta.
        theta_init: initial keep probability of every gate (1 = start from the full network).
        estimator: the theta gradient: ``"straight_through"`` (the mask's derivative at the
            sampled gate) or ``"balanced"`` (the derivatives with the gate on and off weighted
            equally, so its mean is the same at every theta and theta does not settle between
            0 and 1; method.md section 4).
        warmup: steps over which the cost strength ramps linearly from 0 to ``gamma``. At
            the start the weights are random and no unit is worth its cost yet; a full
            ``gamma`` from step 0 can switch off whole layers before the network learns
            what it needs.
        check_every: steps between pruning checks.
        theta_tol: theta at or below this counts as switched off.
        w_tol: a structure's weight RMS must be at most ``w_tol`` times the RMS of the kept
            weights of its group (layer gates: of the whole model) to be removed.
        patience: consecutive checks a structure must pass before it is removed.
        reset_moments: when a structure's theta has been switched off for ``patience`` checks
            but its weights are not yet small, zero its optimizer moments, so that the spike
            prior alone drives them (adaptive optimizers otherwise damp that pull with
            second moments remembered from the structure's active past).
        cost_reference: a :class:`CostReference` (FLOPs per example, parameters, gates)
            the cost is normalised by; ``None`` means the dense model's own
            (``Objective(gated).reference``). Give models of different widths the same
            reference and a unit costs the same in all of them.
    """

    structures: Literal["units", "layers", "both"] = "both"
    gamma: float = 1.0
    cost: Literal["complexity", "structures"] = "complexity"
    beta: float = 0.5
    alpha: float = 1.0
    lam1: float = 5e-4
    spike_ratio: float = 100.0
    theta_lr: float = 0.05
    theta_init: float = 1.0
    estimator: Literal["straight_through", "balanced"] = "straight_through"
    warmup: int = 0
    check_every: int = 50
    theta_tol: float = 0.01
    w_tol: float = 0.1
    patience: int = 2
    reset_moments: bool = True
    cost_reference: CostReference | None = None

    def __post_init__(self) -> None:
        if self.structures not in ("units", "layers", "both"):
            raise ValueError(f"PruneConfig.structures must be 'units', 'layers' or 'both', got {self.structures!r}")
        for name in ("theta_init", "beta", "theta_tol"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PruneConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("gamma", "alpha", "lam1", "spike_ratio", "theta_lr", "w_tol"):
            if getattr(self, name) < 0:
                raise ValueError(f"PruneConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"PruneConfig.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.cost not in COSTS:
            raise ValueError(f"PruneConfig.cost must be one of {COSTS}, got {self.cost!r}")
        if self.cost_reference is not None:
            if len(self.cost_reference) != 3 or min(self.cost_reference) <= 0:
                raise ValueError("PruneConfig.cost_reference must be a CostReference(flops, params, structures) of "
                                 f"positive numbers, got {self.cost_reference!r}")
            self.cost_reference = CostReference(*self.cost_reference)
        if self.warmup < 0:
            raise ValueError(f"PruneConfig.warmup must be >= 0 steps, got {self.warmup}")
        if self.check_every < 1 or self.patience < 1:
            raise ValueError("PruneConfig.check_every and patience must be >= 1")

    @property
    def lam0(self) -> float:
        return self.spike_ratio * self.lam1

    @property
    def units(self) -> bool:
        return self.structures in ("units", "both")

    @property
    def layers(self) -> bool:
        return self.structures in ("layers", "both")
