"""One config object for the whole method (PyTorch quantization's ``QConfig`` style).

The symbols follow ``method.md``: ``gamma`` (strength of the complexity cost), ``beta``
(FLOPs versus parameters), ``alpha`` (layer versus unit balance), ``lam1`` (slab
precision = ordinary weight decay) and ``spike_ratio`` (``lam0 = spike_ratio * lam1``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import KW_ONLY, dataclass
from typing import Literal, NamedTuple

from .gates import ESTIMATORS

__all__ = ["PruneConfig", "CostReference", "COSTS", "EXEMPT_KINDS"]

#: the cost measures ``PruneConfig.cost`` accepts
COSTS = ("complexity", "structures", "gates")
#: the kinds of parameter ``PruneConfig.prior_exempt`` can leave out of the weight prior
EXEMPT_KINDS = ("bias", "norm", "embedding")


class CostReference(NamedTuple):
    """What the cost is normalised by: FLOPs per example, parameters, and gates (structures)."""

    flops: float
    params: float
    structures: float


@dataclass
class PruneConfig:
    """What to gate, the objective's knobs, the budget and its schedule, and the pruning
    conditions, in that order (every field but ``structures`` is given by name).

    Attributes:
        structures: which structures get gates: ``"units"`` (channel groups),
            ``"layers"`` (residual branches) or ``"both"``.
        exclude: module names or ``fnmatch`` patterns (``"conv1"``, ``"layer4.*"``) whose
            channels are never gated: every channel group a matching module produces or
            reads is kept whole, and no residual branch containing one gets a layer gate.
        min_units: every channel dimension keeps at least this many units (or all it has).
        min_share: every gated group keeps at least this share of the units it had when
            the gates were built, rounded up (and at least ``min_units``): a residual
            stream or a stem is never cut to a few channels. The cost prices the floor (a
            group at it saves nothing more, so the budget is sought elsewhere), and eval
            mode, the removals and the decision keep it. 0 leaves ``min_units`` alone.
        multiple_of: every pruned width (a group's units: channels, heads, head_dims) is
            kept as a multiple of this, or whole: what tensor cores (8, 16) and tensor
            parallelism (kept heads and MLP units divisible by its degree) need. Applied
            at the decision, which the budget's cut searches with it, and by live removal
            (which keeps back switched-off units to round up).
        uniform: repeated blocks (the layers of a ``ModuleList`` built from one class)
            keep the same width for the same role: every layer the same number of heads,
            the same MLP width (decided jointly at the decision; live removal takes from
            each layer only what it can take from all), so a stock config can describe
            the pruned model (:func:`fxprune.hf.to_pretrained`).
        theta_init: initial keep probability of every gate (1 = start from the full network).
        estimator: the theta gradient: ``"straight_through"`` (the mask's derivative at the
            sampled gate) or ``"balanced"`` (the derivatives with the gate on and off weighted
            equally, so its mean is the same at every theta and theta does not settle between
            0 and 1; method.md section 4).
        gamma: strength of the complexity cost: task loss traded for removing the whole cost
            (fixed-strength mode). ``None`` (the default): the strength is learnt to meet a
            budget; with no budget given either, ``target_flops=0.5``. With a budget,
            ``gamma`` is not used (warned): the budget controller sets the strength.
        cost: what a structure costs (method.md sections 2 and 3). ``"complexity"``
            (paper C): ``C = beta E[FLOPs]/FLOPs_ref + (1 - beta) E[Params]/Params_ref``, so
            a structure's price is the FLOPs and parameters it removes, which depend on
            the widths around it. ``"structures"`` (paper A's flat hyper-prior): ``C = E[kept
            structures] / structures_ref``, the same price for every gate, whatever the
            widths around it; normalised by the model's own gate count, a wider model's gates
            are cheaper unless ``cost_reference`` fixes the count. ``"gates"``: ``C = E[kept
            structures]``, every gate priced ``gamma`` in units of the task loss (a layer gate
            ``alpha gamma``): the flat prior with a price that does not depend on the model's
            size, so the final widths do not depend on the starting width.
        beta: in [0, 1], weight of FLOPs against parameters in the ``"complexity"`` cost.
        alpha: multiplies the cost gradient of layer gates (>1 favours removing layers).
        cost_reference: a :class:`CostReference` (FLOPs per example, parameters, gates)
            the cost is normalised by; ``None`` means the dense model's own
            (``Objective(gated).reference``). Give models of different widths the same
            reference and a unit costs the same in all of them.
        lam1: slab precision of the weight prior, i.e. the ordinary weight decay.
        spike_ratio: ``lam0 / lam1``, the spike precision that pulls switched-off weights to 0.
        prior_exempt: the kinds of parameter the weight prior (slab and spike) leaves
            alone, as timm's and the Hugging Face Trainer's no-decay groups do: ``"bias"``,
            ``"norm"`` (every other parameter of at most one dimension: norm gains, layer
            scales) and ``"embedding"`` (embedding tables). The default, ``EXEMPT_KINDS``,
            leaves all three alone; ``()`` decays every parameter. A norm's gains are 1 at
            initialisation: decayed, they dominate the prior of a transformer (on a 4-layer
            Llama, 1,152 of its 1,519 squared norm) and pull every gain towards 0. The
            digits grid's fixed-strength recipes (``gamma``) ask for ``()``: they were set
            with the gains in the spike term, which holds a unit's gate up, and without
            them the demo's gamma 30 removes every residual block (91.7 % against 98.3 %).
        prior_decay: how the weight prior reaches the weights. ``"decoupled"``: as AdamW
            decays, each weight moves by ``lr * d prior / dW`` at the optimizer's step,
            outside its update (the prior's gradient does not pass through Adam's
            normalisation, which turns a small L2 into a fixed-size step towards 0 for any
            weight the data barely moves, such as a norm's gains); ``"coupled"``: the
            prior's gradient is added to the task gradient, as SGD's ``weight_decay`` is;
            ``"auto"`` (default): coupled under ``torch.optim.SGD``, decoupled under every
            other optimizer. The thetas get the prior's gradient either way.
        sharpen: weight of ``sum theta (1 - theta)`` in the objective: a small push of
            every theta away from 1/2 (a budget met exactly can otherwise hold gates at
            fractional theta).
        total_steps: the training steps the user plans (optional, recommended with a
            budget: the warm-up, the budget schedule and the decision are then fractions of
            it; without it they are 300, 750 and 1,500 steps).
        target_flops: a budget: the forward FLOPs per example the trained model may keep,
            as a fraction of the dense model's (as the complexity cost counts them).
            The cost's strength is then a Lagrange multiplier the budget controller sets
            at every step (:mod:`fxprune.budget`) so that ``E[FLOPs]/FLOPs_dense`` follows
            the scheduled target, not ``gamma``.
        target_params: the same for the parameters. Both at once: two multipliers.
        pressure: how the budget controller presses the gates towards the budget.
            ``"uniform"`` (default): every gate whose removal saves cost is pressed alike
            (a layer gate ``alpha`` times), the strength set at every step so the
            expected cost follows the schedule: which structures go is the data
            gradient's choice, and a structure's price counts through the budget it
            uses. ``"cost"``: each gate is pressed by its cost gradient (the budget's
            Lagrangian), so what costs more is pressed harder. A first-order data
            gradient sees one unit at a time and under-values units that are redundant
            one by one but not together; a residual stream's channels, which feed every
            layer, are the costliest units and went first under ``"cost"`` (a 4-layer
            Llama's stream 128 -> 58 channels at half the FLOPs, +20 % bits per byte
            against +4 %; resnet18 under AdamW 2.8 points lower over two seeds).
        budget_lr: in (0, 1], the share of its distance to the scheduled target that one
            theta step takes an expected cost over its target (``None``: 1, the whole
            distance: the cost is on the schedule at every step).
        warmup: how long the cost strength ramps linearly from 0 to ``gamma``: steps (an
            int), or a fraction of ``total_steps`` (a float); ``None``: a tenth of
            ``total_steps`` when it is given, else 300 steps. At the start the weights are
            random and no unit is worth its cost yet; a full ``gamma`` from step 0 can
            switch off whole layers before the network learns what it needs.
        budget_steps: with a budget, the target falls from 1 to its value over this many
            steps after the warm-up (a cubic schedule), so the model shrinks while it
            learns instead of all at once: steps (an int), a fraction of ``total_steps``,
            or ``None``: a quarter of ``total_steps`` (750 steps without it), so that the
            budget is reached at about a third of the run; 0: at once.
        decide: the step at which the gates are decided: every theta is rounded to what
            eval mode keeps (0 or 1) and stays, what is off is removed at once, and the
            rest of training fine-tunes the model that will be deployed. Steps (an int), a
            fraction of ``total_steps``, 0 (never), or ``None``: with a budget, at 0.6 of
            ``total_steps`` (or when the schedule is over plus a fifth of it, plus 300
            steps, without ``total_steps``), so the deployed model is fine-tuned for the last
            0.4 of the run; without a budget, never.
        theta_lr: learning rate of the projected SGD on theta.
        check_every: steps between pruning checks; ``None``: a fortieth of ``total_steps``
            (2 to 20 steps), or 20 without it. A structure switched off is removed
            ``patience - 1`` to ``patience`` checks later, so this sets how long training
            still pays for it; a check reads the thetas and weight norms (one host
            synchronisation), and a removal rewrites the graph once.
        theta_tol: theta at or below this counts as switched off.
        w_tol: a structure's weight RMS must be at most ``w_tol`` times the RMS of the kept
            weights of its group (layer gates: of the whole model) to be removed; ``None``:
            the theta condition alone (a structure whose gate has been off for ``patience``
            checks contributes nothing in training or eval, so its removal changes no
            function, whatever its weights; removal does not wait for the optimizer to
            shrink them).
        patience: consecutive checks a structure must pass before it is removed.
        reset_moments: when a structure's theta has been switched off for ``patience`` checks
            but its weights are not yet small, zero its optimizer moments once, so that the
            spike prior alone drives them (adaptive optimizers otherwise damp that pull with
            second moments remembered from the structure's active past).

    Every field is checked when it is set, at construction and on later assignment
    (``config.gamma = -5`` raises), and the error names the field.
    """

    # -- what is gated (fixed at prepare)
    structures: Literal["units", "layers", "both"] = "both"
    _: KW_ONLY  # every other field by name
    exclude: tuple[str, ...] = ()
    min_units: int = 1
    min_share: float = 0.1
    multiple_of: int | None = None
    uniform: bool = False
    theta_init: float = 1.0
    estimator: Literal["straight_through", "balanced"] = "balanced"
    # -- the objective: the cost and the weight prior
    gamma: float | None = None
    cost: Literal["complexity", "structures", "gates"] = "complexity"
    beta: float = 0.5
    alpha: float = 1.0
    cost_reference: CostReference | None = None
    lam1: float = 5e-4
    spike_ratio: float = 100.0
    prior_exempt: tuple[str, ...] = EXEMPT_KINDS
    prior_decay: Literal["auto", "coupled", "decoupled"] = "auto"
    sharpen: float = 0.002
    # -- the budget and the schedule: the budget controller and the theta step
    total_steps: int | None = None
    target_flops: float | None = None
    target_params: float | None = None
    pressure: Literal["uniform", "cost"] = "uniform"
    budget_lr: float | None = None
    warmup: int | float | None = None
    budget_steps: int | float | None = None
    decide: int | float | None = None
    theta_lr: float = 2.0
    # -- the pruning conditions: the pruning check
    check_every: int | None = None
    theta_tol: float = 0.01
    w_tol: float | None = None
    patience: int = 2
    reset_moments: bool = True

    def check_steps(self) -> int:
        """``check_every`` in steps (None: ``total_steps // 40`` in [2, 20], or 20 without it)."""
        if self.check_every is not None:
            return self.check_every
        return min(DEFAULT_CHECK_EVERY, max(2, self.total_steps // 40)) if self.total_steps else DEFAULT_CHECK_EVERY

    def schedule_steps(self) -> int:
        """``budget_steps`` in steps (a fraction is taken of ``total_steps``; None: a quarter
        of ``total_steps`` when it is given, else ``DEFAULT_BUDGET_STEPS``)."""
        if self.budget_steps is None:
            return round(BUDGET_STEPS * self.total_steps) if self.total_steps else DEFAULT_BUDGET_STEPS
        return self._steps("budget_steps", self.budget_steps)

    def budget_rate(self) -> float:
        """``budget_lr``, or its default: 1 (the whole distance to the target at every step)."""
        return 1.0 if self.budget_lr is None else self.budget_lr

    def decide_step(self) -> int:
        """``decide`` in steps (0: never; a fraction is taken of ``total_steps``; None: when
        the budget schedule is over plus a fifth of it, or 0.6 of ``total_steps``
        when that is given)."""
        if self.decide is None:
            if self.total_steps:
                return max(round(DECIDE * self.total_steps), self.warmup_steps() + self.schedule_steps())
            return self.warmup_steps() + round(DECIDE_AFTER * self.schedule_steps()) + DECIDE_MARGIN
        return self._steps("decide", self.decide)

    def _steps(self, name: str, value: int | float) -> int:
        if isinstance(value, int):
            return value
        if self.total_steps is None:
            raise ValueError(f"PruneConfig.{name}={value} is a fraction of total_steps: give "
                             f"PruneConfig(total_steps=...), or {name} in steps (an int)")
        return round(value * self.total_steps)

    def warmup_steps(self) -> int:
        """``warmup`` in steps (a fraction is taken of ``total_steps``; None: a tenth of
        ``total_steps`` if given, else ``DEFAULT_WARMUP`` steps)."""
        if self.warmup is None:
            return round(WARMUP * self.total_steps) if self.total_steps else DEFAULT_WARMUP
        return self._steps("warmup", self.warmup)

    @property
    def targets(self) -> dict[str, float]:
        """The budgets: ``{"flops": f, "params": p}`` (either may be absent); with neither
        a budget nor ``gamma`` given, the default budget ``{"flops": DEFAULT_TARGET_FLOPS}``."""
        set_ = {k: v for k, v in (("flops", self.target_flops), ("params", self.target_params)) if v is not None}
        if not set_ and self.gamma is None:
            return {"flops": DEFAULT_TARGET_FLOPS}
        return set_

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, _check(name, value))

    @property
    def lam0(self) -> float:
        return self.spike_ratio * self.lam1

    @property
    def units(self) -> bool:
        return self.structures in ("units", "both")

    @property
    def layers(self) -> bool:
        return self.structures in ("layers", "both")


_CHOICES = {"structures": ("units", "layers", "both"), "cost": COSTS, "estimator": ESTIMATORS,
            "prior_decay": ("auto", "coupled", "decoupled"), "pressure": ("uniform", "cost")}
#: (lowest, highest, lowest allowed, highest allowed) of the number fields
_RANGES = {
    "gamma": (0.0, math.inf, True, False), "alpha": (0.0, math.inf, True, False), "lam1": (0.0, math.inf, True, False),
    "spike_ratio": (0.0, math.inf, True, False), "theta_lr": (0.0, math.inf, True, False),
    "w_tol": (0.0, math.inf, True, False), "beta": (0.0, 1.0, True, True), "theta_init": (0.0, 1.0, True, True),
    "theta_tol": (0.0, 1.0, True, True), "target_flops": (0.0, 1.0, False, True),
    "target_params": (0.0, 1.0, False, True), "budget_lr": (0.0, 1.0, False, True),
    "sharpen": (0.0, math.inf, True, False), "min_share": (0.0, 1.0, True, False),
}
_INTS = {"check_every": 1, "patience": 1, "min_units": 1, "multiple_of": 1}
_OPTIONAL = {"multiple_of", "check_every", "gamma", "budget_lr", "w_tol", "total_steps", "target_flops", "target_params", "warmup", "budget_steps", "decide"}
#: the warm-up, the budget schedule and the decision, as fractions of ``total_steps``: the budget is
#: reached at about a third of the run, and the model the decision fixes is fine-tuned for the last 0.4
WARMUP, BUDGET_STEPS, DECIDE = 0.1, 0.25, 0.6
#: the warm-up, in steps, when neither ``warmup`` nor ``total_steps`` is given
DEFAULT_WARMUP = 300
#: without ``total_steps``, the decision comes this many schedules after the warm-up, plus ``DECIDE_MARGIN`` steps
DECIDE_AFTER, DECIDE_MARGIN = 1.2, 300
#: steps between pruning checks when neither ``check_every`` nor ``total_steps`` is given
DEFAULT_CHECK_EVERY = 20
#: the budget schedule's length, in steps, when neither ``budget_steps`` nor ``total_steps`` is given
DEFAULT_BUDGET_STEPS = 750
#: the budget of ``PruneConfig()``: half the dense model's FLOPs
DEFAULT_TARGET_FLOPS = 0.5


def _check(name: str, value: object) -> object:
    """``value`` for field ``name`` of :class:`PruneConfig` (normalised), or a
    ``TypeError``/``ValueError`` that names the field."""
    field_ = f"PruneConfig.{name}"
    if name in _OPTIONAL and value is None:
        return None
    if name == "total_steps":
        return _check_int(field_, value, 1)
    if name in ("warmup", "budget_steps", "decide"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{field_} must be steps (an int) or a fraction of total_steps (a float), got {value!r}")
        if isinstance(value, numbers.Integral):
            return _check_int(field_, value, 0)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{field_} as a float is a fraction of total_steps, in [0, 1]; got {value:g}")
        return float(value)
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"{field_} must be one of {_CHOICES[name]}, got {value!r}")
    elif name in _RANGES:
        lo, hi, lo_ok, hi_ok = _RANGES[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{field_} must be a number, got {value!r} ({type(value).__name__})")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{field_} must be finite, got {value}")
        if not (lo <= value if lo_ok else lo < value) or not (value <= hi if hi_ok else value < hi):
            bounds = f"in {'[' if lo_ok else '('}{lo:g}, {hi:g}]" if hi_ok else f"{'>=' if lo_ok else '>'} {lo:g}"
            raise ValueError(f"{field_} must be {bounds}, got {value:g}")
    elif name in _INTS:
        value = _check_int(field_, value, _INTS[name])
    elif name in ("reset_moments", "uniform"):
        if not isinstance(value, bool):
            raise TypeError(f"{field_} must be True or False, got {value!r}")
    elif name == "cost_reference" and value is not None:
        ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value)
        if not ok:
            raise ValueError(f"{field_} must be a CostReference(flops, params, structures) of positive numbers, "
                             f"got {value!r}")
        value = CostReference(*(float(v) for v in value))  # type: ignore[attr-defined]  # checked iterable above
    elif name == "prior_exempt":
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (tuple, list)) or any(v not in EXEMPT_KINDS for v in value):
            raise ValueError(f"{field_} must be a tuple of {EXEMPT_KINDS}, got {value!r}")
        value = tuple(value)
    elif name == "exclude":
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{field_} must be module names or patterns (strings), got {value!r}")
        value = tuple(value)
    return value


def _check_int(field_: str, value: object, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field_} must be a whole number, got {value!r} ({type(value).__name__})")
    if value < lowest:
        raise ValueError(f"{field_} must be >= {lowest}, got {value}")
    return int(value)
