"""Checkpoint a gated model mid-training and resume it on the same trajectory.

    save_checkpoint("run.ckpt", gated, optimizer, pruner, scheduler, epoch=3)
    ...
    gated = fxprune.prepare(model, x, config)          # as at the start of training
    optimizer = torch.optim.Adam(gated.parameters())
    pruner = fxprune.Pruner(gated, optimizer)
    extra = load_checkpoint("run.ckpt", gated, optimizer, pruner, scheduler)   # {"epoch": 3}

A checkpoint holds the weights and thetas, the removals made so far (replayed on the fresh
model, so that every parameter and optimizer moment has its checkpointed shape), the
optimizer and scheduler states, the pruner's counters, and the random number generators'
states (the gates sample from torch's generator): resumed training takes the same steps.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from .files import writable
from .pruner import Pruner

__all__ = ["save_checkpoint", "load_checkpoint"]

FORMAT = "fxprune-checkpoint-2"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, gated: fx.GraphModule, optimizer: torch.optim.Optimizer, pruner: Pruner,
                    scheduler: Any = None, **extra: Any) -> Path:
    """Write everything needed to resume training to ``path`` (atomically: a crash while
    writing leaves the previous checkpoint). ``extra`` (epoch, data-loader position, ...)
    comes back from :func:`load_checkpoint`."""
    path = writable(path, "the checkpoint")
    state = {
        "format": FORMAT,
        "model": gated.state_dict(),
        "optimizer": optimizer.state_dict(),
        "pruner": pruner.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(),
        "extra": extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, gated: fx.GraphModule, optimizer: torch.optim.Optimizer, pruner: Pruner,
                    scheduler: Any = None, restore_rng: bool = True) -> dict:
    """Restore a checkpoint into a freshly prepared ``gated`` model, its ``optimizer`` and
    ``pruner`` (and ``scheduler``), built exactly as at the start of training. Returns the
    ``extra`` values given to :func:`save_checkpoint`."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not an fxprune checkpoint (written by fxprune.checkpoint.save_checkpoint)")
    pruner.load_state_dict(state["pruner"])
    try:
        gated.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(
            f"the checkpoint '{path}' does not fit this model: prepare the same model with the same config "
            f"as the run that wrote it ({str(exc).splitlines()[0]})") from None
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"the checkpoint '{path}' has no scheduler state; resume without a scheduler")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return dict(state["extra"])
