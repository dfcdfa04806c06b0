"""Per-optimizer adapters: which state entries of a parameter are laid out like it.

Live removal slices a parameter and, with the same indices, every per-element state
entry the optimizer keeps for it (momentum, Adam's moments, RMSprop's averages,
Adagrad's sums); scalar entries (``step``) stay. torch's common optimizers have a
declared layout, and a key outside it is refused. Any other optimizer gets the generic
layout (:data:`BY_SHAPE`): a state tensor with the parameter's shape is per-element
(sliced like it), a tensor of one element or a number is scalar (kept), and anything
else (Adafactor's factored moments) is refused at the removal with an error naming the
optimizer and the entry, before anything is changed. Register a layout for your own
optimizer with :func:`register_optimizer`. An optimizer wrapper holding the real one in
``.optimizer`` (accelerate's ``AcceleratedOptimizer``) is read through: :func:`unwrap`.

Example::

    >>> class MyOptimizer(torch.optim.Optimizer):
    ...     pass                               # its state: "velocity" per element, a scalar "step"
    >>> register_optimizer(MyOptimizer, per_element=("velocity",), scalar=("step",))
    >>> layout_of(MyOptimizer([torch.zeros(1)], {}))
    StateLayout(per_element=('velocity',), scalar=('step',), by_shape=False)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .passes.surgery import index_tensor

__all__ = ["StateLayout", "BY_SHAPE", "register_optimizer", "layout_of", "unwrap", "UnsupportedOptimizer",
           "plan_slices", "zero_entries", "check_optimizer", "check_holds"]


class UnsupportedOptimizer(TypeError):
    """The optimizer's state cannot be sliced when structures are removed."""


@dataclass(frozen=True)
class StateLayout:
    """State keys that are shaped like the parameter (``per_element``) or are not (``scalar``)."""

    per_element: tuple[str, ...]
    scalar: tuple[str, ...] = ()
    #: the generic layout: entries are classified by their shape, not by a declared key
    by_shape: bool = False


#: the layout of an optimizer without a declared one
BY_SHAPE = StateLayout((), (), by_shape=True)


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


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer that holds the state: ``optimizer`` itself, or the one a wrapper
    holds in ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, nested or not)."""
    seen = optimizer
    while isinstance(getattr(seen, "optimizer", None), torch.optim.Optimizer) and seen.optimizer is not seen:
        seen = seen.optimizer
    if not isinstance(seen, torch.optim.Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer, nor a wrapper holding one in "
                        "'.optimizer': pass the optimizer that trains the gated model")
    return seen


def layout_of(optimizer: torch.optim.Optimizer) -> StateLayout:
    """The declared layout of ``optimizer``'s class (the nearest registered base class),
    or :data:`BY_SHAPE`."""
    for cls in type(unwrap(optimizer)).__mro__:
        if cls in _LAYOUTS:
            return _LAYOUTS[cls]
    return BY_SHAPE


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise now for what is not an optimizer (nor a wrapper of one)."""
    unwrap(optimizer)


def plan_slices(optimizer: torch.optim.Optimizer, param: Tensor, slices: list[tuple[int, np.ndarray]]) -> dict[str, Tensor]:
    """The new per-element state entries of ``param`` once it keeps ``slices`` (nothing
    is changed). Raises :class:`UnsupportedOptimizer` for a key the layout does not
    declare or a per-element entry not shaped like the parameter."""
    optimizer = unwrap(optimizer)
    state = optimizer.state.get(param)
    if not state:
        return {}
    layout = layout_of(optimizer)
    out = {}
    for key, value in state.items():
        if key in layout.scalar or value is None:
            continue
        if layout.by_shape:
            if isinstance(value, Tensor) and value.shape == param.shape:
                out[key] = index_tensor(value, slices)
            elif isinstance(value, Tensor) and value.numel() > 1:
                raise UnsupportedOptimizer(
                    f"{type(optimizer).__name__} keeps a state entry '{key}' of shape {tuple(value.shape)} for a "
                    f"parameter of shape {tuple(param.shape)}: fxprune slices state shaped like the parameter and keeps "
                    "scalars, and cannot tell how this one follows the parameter's entries; declare its layout with "
                    "fxprune.optim_state.register_optimizer, or use an optimizer whose state is per element")
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
    optimizer = unwrap(optimizer)
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
    optimizer = unwrap(optimizer)
    state = optimizer.state.get(param)
    if not state:
        return
    layout = layout_of(optimizer)
    for key in (state if layout.by_shape else layout.per_element):
        value = state.get(key)
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.index_fill_(dim, index.to(value.device), 0.0)
