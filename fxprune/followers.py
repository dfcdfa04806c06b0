"""Copies of the gated model that follow its live removals: an EMA of the weights
(``torch.optim.swa_utils.AveragedModel``, timm's ``ModelEmaV2``/``ModelEmaV3``), a teacher,
anything that holds a copy of the gated model in its ``module`` attribute.

A copy made at the start of training keeps the dense shapes; at the first removal its
next update fails on a size mismatch. :func:`follow_copy` gives a removal follower
(:meth:`fxprune.Pruner.follow` registers it) that, inside the removal's transaction,
builds the copy again with the live model's structure and fills it with the copy's own
values sliced as the record says (``Removal.slices``): the kept entries of the average
are the average's, not the live weights'. fxprune's own buffers (the thetas, the gate
reads) are the live model's, so the copy's gates are the live gates at the removal.

Example::

    >>> ema = torch.optim.swa_utils.AveragedModel(gated)
    >>> ema = pruner.follow(ema)               # its module is rebuilt at every removal
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import fx

from .passes.insert_gates import BANK, LAYERS, READS
from .passes.surgery import index_tensor
from .resume import PRUNER_KEY, REMOVALS_KEY
from .state import PRUNER, STATE, PruneState, Removal, state_of

__all__ = ["follow_copy", "rebuilt_copy"]

#: fxprune's own tensors in a gated model: derived from the gate layout, taken from the live model
_OWN = tuple(f"{name}." for name in (BANK, READS, LAYERS))


def _held(holder: Any, gated: fx.GraphModule) -> fx.GraphModule:
    module = getattr(holder, "module", None)
    if not isinstance(module, fx.GraphModule) or not isinstance(module.meta.get(STATE), PruneState):
        raise TypeError(
            f"cannot follow {type(holder).__name__}: a follower holds a copy of the gated model in its 'module' "
            "attribute (torch.optim.swa_utils.AveragedModel(gated), timm's ModelEmaV3(gated)); build it from the "
            "gated model fxprune.prepare returned")
    if module is gated:
        raise ValueError(f"{type(holder).__name__}.module is the gated model itself, not a copy: nothing to follow")
    have, live = state_of(module).version, state_of(gated).version
    if have != live:
        raise ValueError(
            f"{type(holder).__name__} holds a copy of the gated model from before {live - have} of its live removals: "
            "build it from the model as it is now, then call pruner.follow on it before the next removal")
    return module


def rebuilt_copy(old: fx.GraphModule, gated: fx.GraphModule, record: Removal) -> fx.GraphModule:
    """A copy with the live structure of ``gated`` (just after ``record``) and the values of
    ``old`` (a copy from just before it), sliced as the record says."""
    new = copy.deepcopy(gated)
    new.meta.pop(PRUNER, None)  # the copy has no Pruner of its own
    values = old.state_dict()
    target = new.state_dict()
    out = {}
    for name, live in target.items():
        if name in (REMOVALS_KEY, PRUNER_KEY):  # records of the removals and the Pruner, not tensors of the model
            continue
        if name.startswith(_OWN) or name not in values:
            out[name] = live
            continue
        value = index_tensor(values[name], record.slices[name]) if name in record.slices else values[name]
        if value.shape != live.shape:
            raise RuntimeError(f"'{name}' of the copy has shape {tuple(value.shape)} after the removal's slices, the "
                               f"live model's {tuple(live.shape)}: the copy does not hold the model it follows")
        out[name] = value
    new.load_state_dict(out)
    flags = {n: p.requires_grad for n, p in old.named_parameters()}
    for name, p in new.named_parameters():
        p.grad = None
        p.requires_grad_(flags.get(name, p.requires_grad))
    first = next(iter(values.values()), None)
    if first is not None:
        new.to(first.device)
    return new.train(old.training)


def follow_copy(holder: Any, gated: fx.GraphModule) -> Callable[[Removal], Callable[[], None]]:
    """A removal follower that rebuilds ``holder.module`` (a copy of ``gated``) after every
    live removal; it returns the undo a later follower's failure calls."""
    _held(holder, gated)

    def follow(record: Removal) -> Callable[[], None]:
        old = holder.module
        holder.module = rebuilt_copy(old, gated, record)
        return lambda: setattr(holder, "module", old)

    return follow
