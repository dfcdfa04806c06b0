"""The cut at the decision: the 0/1 gates whose compact model is closest to the budgets.

Rounding every theta at 0.5 is what eval mode keeps; under a budget it can miss by more
than ``TOLERANCE`` when thetas are still fractional at the decision and each weighs several
per cent of the FLOPs (a ResNet's blocks). :func:`closest_to_budget` then keeps the
structures of highest score instead: a bisection over the distinct scores finds the two
cuts around the budget in a few evaluations of the exact cost, and :func:`fill` completes
the cut under it greedily, since the structure at the cut can weigh more than the gap.

Example::

    >>> bank = gate_bank(gated)
    >>> keep, rounded, miss = closest_to_budget(pruner.objective, bank, bank.deterministic(), {"flops": 0.5})
    >>> keep.shape == bank.theta.shape, rounded > 0.05     # every gate on misses the budget
    (True, True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .gates import GateBank
from .objective import Objective
from .passes.units import floor_keep

__all__ = ["TOLERANCE", "DECIDED", "closest_to_budget", "decide", "fill", "undecided"]

log = logging.getLogger("fxprune")

TOLERANCE = 0.05  # a relative miss of the budget the decision accepts from rounding at 0.5
DECIDED = 0.01  # a theta within this of 0 or 1 is decided: the cut never drops a gate training kept at 1
FILL_TRIES = 256  # structures the greedy fill tries at most (each is one evaluation of the cost)


def decide(objective: Objective, bank: GateBank, shape: Callable[[Tensor], Tensor], targets: dict[str, float],
           step: int) -> tuple[Tensor, float, float]:
    """The decision's keep mask ``(keep, share of gates undecided, relative miss of the
    budgets)``: every theta rounded to what eval mode keeps (``shape`` applied), or under
    budgets the cut :func:`closest_to_budget` gives. Logs what it finds at ``step``."""
    keep = shape(bank.deterministic())
    share = undecided(bank.theta.detach())
    if share > 0.01:
        log.warning("step %d: %.1f%% of the gates are undecided (theta in (%g, %g)) at the decision: the budget's "
                    "schedule did not separate them; the decision rounds them", step, 100 * share, DECIDED, 1 - DECIDED)
    if not targets:
        return keep, share, 0.0
    cut, rounded, miss = closest_to_budget(objective, bank, keep, targets, shape)
    if cut is not keep:
        log.info("step %d: rounding at 0.5 misses the budget by %.1f%%; the %d structures of highest theta that fit "
                 "miss it by %.1f%%", step, 100 * rounded, int(cut.sum()), 100 * miss)
    return cut, share, miss


def closest_to_budget(objective: Objective, bank: GateBank, keep: Tensor, targets: dict[str, float],
                      shape: Callable[[Tensor], Tensor] = lambda k: k) -> tuple[Tensor, float, float]:
    """``(cut, miss of keep, miss of cut)``: ``keep`` itself when it misses no budget by more
    than ``TOLERANCE`` (relative), else the structures of highest score whose compact model
    is the closest to every budget (the largest relative miss, over the budgets, is the
    smallest), when that is closer than ``keep``. A gate training has decided on (theta at
    least ``1 - DECIDED``) is never dropped: a budget the cut cannot reach without cutting
    what training kept (a residual stream, the stem) is missed, and said so by the
    pruner, rather than met by destroying the model. The score is theta, ties (the gates a sharp
    dual step has just switched off, all at 0 but not yet removed) broken by the weights'
    RMS. The fractions only grow as the cut falls, so a bisection over the distinct scores
    finds the two cuts around the budget; the one under it is filled (:func:`fill`).
    ``shape`` rounds every cut it makes to the widths ``multiple_of`` and ``uniform`` allow
    (:class:`fxprune.shaping.Shaper`), so the search measures the cuts it can take; ``keep``
    comes shaped already."""

    def misses(k: Tensor) -> list[float]:  # signed relative misses, one per budget: > 0 is over it
        with torch.no_grad():
            fractions = objective.fractions_at(k)
        return [float((fractions[n] - t) / t) for n, t in targets.items()]

    def miss(k: Tensor) -> float:
        return max(abs(m) for m in misses(k))

    rounded = miss(keep)
    if rounded <= TOLERANCE:
        return keep, rounded, rounded
    theta = bank.theta.detach()
    with torch.no_grad():
        sq = objective.squared_norms()[1].to(torch.float64)
        rms = (sq / objective.elems.to(sq).clamp_min(1)).sqrt()
    score = theta.to(torch.float64) + 1e-6 * rms / rms.max().clamp_min(1e-30)
    levels = torch.unique(score)  # ascending

    decided_on = theta >= 1 - DECIDED  # what training kept stays: the cut moves only gates it left undecided

    def at(i: int) -> Tensor:  # the structures scored at or above levels[i]
        return shape(floor_keep((score >= levels[i]) | decided_on, score, bank.segments, bank.least).to(theta.dtype))

    lo, hi = 0, levels.numel() - 1  # the cut at lo keeps the most, at hi the least
    if max(misses(at(hi))) > 0:  # the fewest structures are still over: keep them
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if max(misses(at(mid))) > 0:
            lo = mid
        else:
            hi = mid
    under = at(hi)
    if max(misses(under)) <= 0:  # fill what the cut leaves of the budget, skipping what does not fit
        under = shape(fill(under, score, misses))
    best, best_miss = min(((k, miss(k)) for k in (under, at(lo))), key=lambda c: c[1])
    return (best, rounded, best_miss) if best_miss < rounded else (keep, rounded, rounded)


def fill(keep: Tensor, score: Tensor, misses: Callable[[Tensor], list[float]]) -> Tensor:
    """Greedy fill of a cut under the budgets: the structures it drops, in descending
    score, are added one by one when that brings the model closer to them without going
    over any by more than ``TOLERANCE`` (two budgets: the binding one is met, the other may
    stay under). The cut's next structure can weigh more than what is left (a ResNet's
    block, a residual stream channel); those ranked after it that fit are kept instead. At
    most ``FILL_TRIES`` structures are tried, and it stops once within ``TOLERANCE``."""
    keep = keep.clone()

    def miss(k: Tensor) -> float:
        m = misses(k)
        return max(abs(v) for v in m) if max(m) <= TOLERANCE else math.inf

    current = miss(keep)
    for i in torch.argsort(torch.where(keep > 0, -math.inf, score), descending=True)[:FILL_TRIES].tolist():
        if current <= TOLERANCE or keep[i] > 0:
            break
        keep[i] = 1
        trial = miss(keep)
        if trial < current:
            current = trial
        else:
            keep[i] = 0
    return keep


def undecided(theta: Tensor) -> float:
    """The share of ``theta`` strictly between ``DECIDED`` and ``1 - DECIDED``."""
    if not theta.numel():
        return 0.0
    return float(((theta > DECIDED) & (theta < 1 - DECIDED)).float().mean())
