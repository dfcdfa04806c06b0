"""Pruning inside the Hugging Face ``Trainer``.

:class:`PruneCallback` builds the :class:`fxprune.Pruner` on the Trainer's model and
optimizer when training begins and steps it after every optimizer step;
:class:`PruneTrainer` is the Trainer with that callback and a ``compute_loss`` that adds
``pruner.penalty()`` to the training loss only, so ``eval_loss`` stays the task's. The
gated model's state dict carries its removals and the Pruner's state
(:mod:`fxprune.resume`), so the Trainer's own checkpoints resume into a freshly prepared
model (``trainer.train(resume_from_checkpoint=...)``).

Prepare the model with the labels among its example inputs, so the gated graph computes
the loss as the model does and the Trainer keeps the ``labels`` column::

    gated = fxprune.prepare(model, (), kwargs={"input_ids": ids, "labels": ids})
    trainer = PruneTrainer(model=gated, args=args, train_dataset=data)
    trainer.train()
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback

from ..config import PruneConfig
from ..pruner import Pruner
from ..state import state_of

__all__ = ["PruneCallback", "PruneTrainer"]


class PruneCallback(TrainerCallback):
    """Builds the Pruner at ``on_train_begin`` (with ``config``, or the prepared one) and
    calls ``pruner.step()`` at every ``on_step_end`` (after the optimizer's step). Add
    ``callback.pruner.penalty()`` to the training loss yourself, or use
    :class:`PruneTrainer`."""

    def __init__(self, config: PruneConfig | None = None) -> None:
        self.config = config
        self.pruner: Pruner | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise ValueError("PruneCallback needs the Trainer's model and optimizer at on_train_begin")
        state_of(model)  # a clear error when the Trainer's model is not the gated model
        if self.pruner is None or self.pruner.gated is not model:
            self.pruner = Pruner(model, optimizer, self.config)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pruner is not None:
            self.pruner.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pruner is not None and self.pruner.config.targets and not self.pruner.decided:
            import warnings

            warnings.warn(f"training ended at step {self.pruner.steps} before the gates were decided (PruneConfig."
                          f"total_steps={self.pruner.config.total_steps}): set total_steps to the Trainer's max_steps",
                          stacklevel=2)


class PruneTrainer(Trainer):
    """A ``Trainer`` that prunes while it trains: a :class:`PruneCallback` (``prune_config``,
    or the config the model was prepared with), and the penalty added to the loss of
    training steps only (evaluation and prediction report the task's loss)."""

    def __init__(self, *args: Any, prune_config: PruneConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prune = PruneCallback(prune_config)
        self.add_callback(self.prune)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training or self.prune.pruner is None:
            return result
        penalty = self.prune.pruner.penalty()
        if return_outputs:
            loss, outputs = result
            return loss + penalty, outputs
        return result + penalty
