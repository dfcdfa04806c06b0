"""Pruning inside Lightning: :class:`PruneCallback`.

At ``on_fit_start`` the callback finds the gated model inside the LightningModule (the
one submodule ``fxprune.prepare`` returned), builds the :class:`fxprune.Pruner` on it and
on the optimizer that trains it, and sets it as ``pl_module.pruner``; add
``self.pruner.penalty()`` to the loss in ``training_step``. After every batch whose
optimizer step ran (gradient accumulation included) it calls ``pruner.step()``. The gated
model's state dict carries its removals and the Pruner's state (:mod:`fxprune.resume`):
Lightning restores the model before it builds the optimizer, so
``trainer.fit(module, ckpt_path=...)`` on a freshly prepared model resumes.

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = fxprune.prepare(net, (x,), fxprune.PruneConfig(total_steps=N))
        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self.model(x), y) + self.pruner.penalty()

    L.Trainer(max_steps=N, callbacks=[PruneCallback()]).fit(Module(), loader)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import fx

from ..config import PruneConfig
from ..pruner import Pruner
from ..state import STATE, PruneState

__all__ = ["PruneCallback"]


def gated_in(module: Any) -> fx.GraphModule:
    """The one gated model inside ``module`` (or ``module`` itself)."""
    found = [m for m in module.modules() if isinstance(m, fx.GraphModule) and isinstance(m.meta.get(STATE), PruneState)]
    if len(found) != 1:
        raise ValueError(f"PruneCallback needs exactly one gated model (from fxprune.prepare) inside "
                         f"{type(module).__name__}; it has {len(found)}")
    return found[0]


class PruneCallback(Callback):
    """Builds the Pruner (with ``config``, or the prepared one) at ``on_fit_start`` as
    ``pl_module.pruner`` and steps it after every optimizer step."""

    def __init__(self, config: PruneConfig | None = None) -> None:
        self.config = config
        self.pruner: Pruner | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        gated = gated_in(pl_module)
        mine = {id(p) for p in gated.parameters()}
        held = [o for o in trainer.optimizers if any(id(p) in mine for g in o.param_groups for p in g["params"])]
        if len(held) != 1:
            raise ValueError(f"PruneCallback needs one optimizer training the gated model; configure_optimizers gave "
                             f"{len(held)} that do")
        if self.pruner is None or self.pruner.gated is not gated:
            self.pruner = Pruner(gated, held[0], self.config)
        pl_module.pruner = self.pruner

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.pruner is not None and self.pruner._optimizer_steps:  # an optimizer step ran in this batch
            self.pruner.step()
