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

import hashlib
import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from . import distributed
from .files import writable
from .passes.errors import exception_line
from .pruner import Pruner

__all__ = ["save_checkpoint", "load_checkpoint"]

FORMAT = "fxprune-checkpoint-2"
#: the first bytes of a checkpoint file; the SHA-256 of the payload (hex) and a newline follow, then the payload
_MAGIC = b"fxprune-checkpoint sha256 "


def _rng_state() -> dict:
    """The generators' states as what ``torch.load(weights_only=True)`` accepts (tensors,
    lists, numbers)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]  # the legacy tuple
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_of(pruner: Pruner) -> dict:
    """What a checkpoint must be loaded into: the dense model's gate layout and the optimizer."""
    layout = pruner.dense_layout
    return {"units": {g: sl.stop - sl.start for g, sl in layout.units.items()}, "layers": sorted(layout.layers),
            "optimizer": type(pruner.optimizer).__name__}


def save_checkpoint(path: str | os.PathLike, gated: fx.GraphModule, optimizer: torch.optim.Optimizer, pruner: Pruner,
                    scheduler: Any = None, **extra: Any) -> Path:
    """Write everything needed to resume training to ``path`` (atomically: a crash while
    writing leaves the previous checkpoint). ``extra`` (epoch, data-loader position, ...)
    comes back from :func:`load_checkpoint`; it must be plain values (numbers, strings,
    lists, dicts, tensors), as the checkpoint is loaded with ``weights_only=True``. Under
    torch.distributed rank 0 writes it (every rank calls this) and it loads on any world
    size."""
    path = Path(path)
    if distributed.active() and distributed.rank() != 0:  # rank 0 writes; the others wait for it
        torch.distributed.barrier()
        return path
    path = writable(path, "the checkpoint")
    state = {
        "format": FORMAT,
        "model_of": _model_of(pruner),
        "model": gated.state_dict(),
        "optimizer": optimizer.state_dict(),
        "pruner": pruner.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": pruner.scaler.state_dict() if pruner.scaler is not None else None,
        "rng": _rng_state(),
        "extra": extra,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a header with the payload's digest, then the payload; on disk before the rename
            f.write(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write the checkpoint to '{path}': {exc.strerror or exc}; choose a writable path") from None
    if distributed.active():
        torch.distributed.barrier()
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: str | os.PathLike) -> dict:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at '{path}'") from None
    source: Any = io.BytesIO(data)
    if data.startswith(_MAGIC):  # this format: the digest of the payload, checked before anything is read
        header = len(_MAGIC) + 65
        digest, payload = data[len(_MAGIC):header - 1].decode(errors="replace"), memoryview(data)[header:]
        if hashlib.sha256(payload).hexdigest() != digest:
            raise ValueError(f"'{path}' is not a readable fxprune checkpoint: it does not match the checksum written "
                             "with it, so it was changed or corrupted after it was saved (a copy cut short, a flipped "
                             "bit); use another checkpoint")
        source = io.BytesIO(payload)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"'{path}' is not a readable fxprune checkpoint (truncated, not written by "
                         f"fxprune.checkpoint.save_checkpoint, or holding objects weights_only loading refuses): "
                         f"{exception_line(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not an fxprune checkpoint (written by fxprune.checkpoint.save_checkpoint)")
    return state


def load_checkpoint(path: str | os.PathLike, gated: fx.GraphModule, optimizer: torch.optim.Optimizer, pruner: Pruner,
                    scheduler: Any = None, restore_rng: bool = True) -> dict:
    """Restore a checkpoint into a freshly prepared ``gated`` model, its ``optimizer`` and
    ``pruner`` (and ``scheduler``), built exactly as at the start of training. Returns the
    ``extra`` values given to :func:`save_checkpoint`. A checkpoint of another model,
    config or optimizer is refused before anything is changed."""
    state = _read(path)
    pruner.require_fresh()
    want, have = state["model_of"], _model_of(pruner)
    if want["optimizer"] != have["optimizer"]:
        raise ValueError(f"the checkpoint '{path}' was written with a {want['optimizer']} optimizer; this run has a "
                         f"{have['optimizer']}: build the optimizer the run that wrote it used")
    if (want["units"], want["layers"]) != (have["units"], have["layers"]):
        raise ValueError(f"the checkpoint '{path}' was written for another model or config (its gates: "
                         f"{len(want['units'])} channel groups, {len(want['layers'])} branches; this model's: "
                         f"{len(have['units'])} and {len(have['layers'])}, or of other sizes): prepare the same model "
                         "with the same config as the run that wrote it")
    saved_groups = state["optimizer"].get("param_groups", [])
    if len(saved_groups) != len(optimizer.param_groups) or any(
            len(g["params"]) > len(h["params"]) for g, h in zip(saved_groups, optimizer.param_groups)):
        raise ValueError(f"the checkpoint '{path}' was written with an optimizer of {len(saved_groups)} parameter "
                         f"group(s) of {[len(g['params']) for g in saved_groups]} parameters; this optimizer has "
                         f"{len(optimizer.param_groups)} of {[len(g['params']) for g in optimizer.param_groups]}: build "
                         "the optimizer's groups as the run that wrote it did")
    if (state.get("scaler") is None) != (pruner.scaler is None):
        raise ValueError(f"the checkpoint '{path}' was written {'with' if state.get('scaler') else 'without'} a "
                         f"GradScaler and this pruner has {'one' if pruner.scaler is not None else 'none'}: give "
                         "fxprune.Pruner(..., scaler=...) as the run that wrote it did")
    pruner.load_state_dict(state["pruner"])
    try:
        gated.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"the checkpoint '{path}' does not fit this model and optimizer: prepare the same model with the same "
            f"config and optimizer as the run that wrote it ({exception_line(exc, with_type=False)})") from None
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"the checkpoint '{path}' has no scheduler state; resume without a scheduler")
        scheduler.load_state_dict(state["scheduler"])
    if pruner.scaler is not None:
        pruner.scaler.load_state_dict(state["scaler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return dict(state["extra"])
