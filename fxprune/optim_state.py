"""Per-optimizer adapters: which state entries of a parameter are laid out like it.

Live removal slices a parameter and, with the same indices, every per-element state
entry the optimizer keeps for it (momentum, Adam's moments, RMSprop's averages,
Adagrad's sums); scalar entries (``step``) stay. The layout is declared per optimizer
class, never guessed from shapes: state of a class or key fxprune does not know is
refused with an error naming the optimizer, before anything is changed. Register a
layout for your own optimizer with :func:`register_optimizer`.

Example::

    >>> class MyOptimizer(torch.optim.Optimizer):
    ...     pass                               # its state: "velocity" per element, a scalar "step"
    >>> register_optimizer(MyOptimizer, per_element=("velocity",), scalar=("step",))
    >>> layout_of(MyOptimizer([torch.zeros(1)], {}))
    StateLayout(per_element=('velocity',), scalar=('step',))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .passes.surgery import index_tensor

__all__ = ["StateLayout", "register_optimizer", "layout_of", "UnsupportedOptimizer", "plan_slices", "zero_entries",
           "check_optimizer", "check_holds"]


class UnsupportedOptimizer(TypeError):
    """The optimizer's state cannot be sliced when structures are removed."""


@dataclass(frozen=True)
class StateLayout:
    """State keys that are shaped like the parameter (``per_element``) or are not (``scalar``)."""

    per_element: tuple[str, ...]
    scalar: tuple[str, ...] = ()


_LAYOUTS: dict[type, StateLayout] = {
    torch.optim.SGD: StateLayout(("momentum_buffer",)),
    torch.optim.Adam: StateLayout(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ("step",)),
    torch.optim.AdamW: StateLayout(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ("step",)),
    torch.optim.RMSprop: StateLayout(("square_avg", "momentum_buffer", "grad_avg"), ("step",)),
    torch.optim.Adagrad: StateLayout(("sum",), ("step",)),
}


def register_optimizer(cls: type, per_element: Iterable[str], scalar: Iterable[str] = ()) -> None:
    """Declare the state layout of optimizer class ``cls`` (and its subclasses)."""
    _LAYOUTS[cls] = StateLayout(tuple(per_element), tuple(scalar))


def layout_of(optimizer: torch.optim.Optimizer) -> StateLayout:
    """The declared layout of ``optimizer``'s class (the nearest registered base class)."""
    for cls in type(optimizer).__mro__:
        if cls in _LAYOUTS:
            return _LAYOUTS[cls]
    known = ", ".join(sorted(c.__name__ for c in _LAYOUTS))
    raise UnsupportedOptimizer(
        f"fxprune does not know how the state of {type(optimizer).__name__} is laid out, so it cannot slice it when "
        f"structures are removed (supported: {known}); declare it with "
        f"fxprune.optim_state.register_optimizer({type(optimizer).__name__}, per_element=(...), scalar=(...))")


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`UnsupportedOptimizer` now for an optimizer class without a layout."""
    layout_of(optimizer)


def plan_slices(optimizer: torch.optim.Optimizer, param: Tensor, slices: list[tuple[int, np.ndarray]]) -> dict[str, Tensor]:
    """The new per-element state entries of ``param`` once it keeps ``slices`` (nothing
    is changed). Raises :class:`UnsupportedOptimizer` for a key the layout does not
    declare or a per-element entry not shaped like the parameter."""
    state = optimizer.state.get(param)
    if not state:
        return {}
    layout = layout_of(optimizer)
    out = {}
    for key, value in state.items():
        if key in layout.scalar or value is None:
            continue
        if key not in layout.per_element:
            raise UnsupportedOptimizer(
                f"{type(optimizer).__name__} keeps a state entry '{key}' that fxprune does not know how to slice "
                f"(known: {', '.join(layout.per_element + layout.scalar)}); declare it with "
                "fxprune.optim_state.register_optimizer")
        if not isinstance(value, Tensor) or value.shape != param.shape:
            raise UnsupportedOptimizer(
                f"{type(optimizer).__name__}'s state entry '{key}' has shape "
                f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}, not the parameter's "
                f"{tuple(param.shape)}: fxprune cannot slice it")
        out[key] = index_tensor(value, slices)
    return out


def check_holds(optimizer: torch.optim.Optimizer, model: torch.nn.Module, lam1: float) -> None:
    """The optimizer must train the gated model's own parameters; weight decay on them
    doubles the prior's ``lam1``."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if id(p) not in held]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"the optimizer does not hold {len(missing)} of the gated model's trainable parameters "
            f"({', '.join(missing[:5])}{more}): build it from gated.parameters() after fxprune.prepare "
            "(prepare works on a copy of the model, so an optimizer over the original trains other tensors)")
    mine = {id(p) for _, p in named}
    decayed = sorted({g.get("weight_decay", 0.0) for g in optimizer.param_groups
                      if g.get("weight_decay", 0.0) and any(id(p) in mine for p in g["params"])})
    if decayed:
        warnings.warn(
            f"the optimizer applies weight_decay={decayed[-1]:g} to gated parameters, and the pruner's penalty already "
            f"holds the ordinary weight decay (PruneConfig.lam1={lam1:g}): decay is applied twice; build the "
            "optimizer with weight_decay=0", stacklevel=3)


def zero_entries(optimizer: torch.optim.Optimizer, param: Tensor, dim: int, index: Tensor) -> None:
    """Zero the per-element state entries of ``param`` at ``index`` along ``dim``."""
    state = optimizer.state.get(param)
    if not state:
        return
    layout = layout_of(optimizer)
    for key in layout.per_element:
        value = state.get(key)
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.index_fill_(dim, index.to(value.device), 0.0)
