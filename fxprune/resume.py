"""A gated model's ``state_dict`` that describes itself: the live removals made so far
travel in it (one ``uint8`` tensor of JSON under :data:`REMOVALS_KEY`, so safetensors,
``torch.load(weights_only=True)`` and every framework's checkpoint carry it), and
``load_state_dict`` into a freshly prepared model replays them first, so the tensors it
then loads have the shapes they were saved with. With a Pruner on the model, the replay
goes through it (its optimizer and counters follow); the optimizer's own state dict,
loaded after, then has the pruned shapes.

    >>> sd = gated.state_dict()                # after live removals, or before
    >>> fresh = fxprune.prepare(make_model(), (x,), config)
    >>> fresh.load_state_dict(sd)              # the removals replayed, then the tensors loaded
    <All keys matched successfully>
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx

from . import live_compaction
from .objective import Objective
from .state import PRUNER, STATE, PruneState, Removal, state_of

__all__ = ["REMOVALS_KEY", "install", "encode", "decode"]

#: the state-dict key (under the gated model's prefix) of its removals
REMOVALS_KEY = "fxprune_removals"
FORMAT = "fxprune-removals-1"


def _entry(r: Removal) -> dict:
    return {"step": int(r.step), "layers": [int(b) for b in r.layers],
            "keep": {str(g): [bool(k) for k in keep] for g, keep in r.keep.items()}}


def encode(removals: list[Removal]) -> Tensor:
    """The removals as a ``uint8`` tensor (JSON): what the state dict carries."""
    data = json.dumps({"format": FORMAT, "removals": [_entry(r) for r in removals]}).encode()
    return torch.tensor(list(data), dtype=torch.uint8)


def decode(t: Tensor) -> list[dict]:
    """The removals :func:`encode` wrote; a clear error for anything else."""
    try:
        record = json.loads(bytes(t.cpu().to(torch.uint8).tolist()).decode())
        assert record["format"] == FORMAT and isinstance(record["removals"], list)
        return record["removals"]
    except Exception as exc:  # any corruption reads as one error
        raise ValueError(f"the state dict's '{REMOVALS_KEY}' is not a record of fxprune removals (written by a gated "
                         "model's state_dict); load a state dict the gated model wrote") from exc


def _save_hook(module: fx.GraphModule, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state = module.meta.get(STATE)
    if isinstance(state, PruneState):
        state_dict[prefix + REMOVALS_KEY] = encode(state.removals)


def _load_hook(module: fx.GraphModule, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
               missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    t = state_dict.pop(prefix + REMOVALS_KEY, None)
    if t is None:  # a state dict from before removals travelled in it, or of the dense model
        return
    saved = decode(t)
    state = state_of(module)
    have = [_entry(r) for r in state.removals]
    if [(h["layers"], h["keep"]) for h in have] != [(s["layers"], s["keep"]) for s in saved[:len(have)]]:
        raise ValueError(f"the state dict was saved after {len(saved)} live removals that do not begin with the "
                         f"{len(have)} this model has had: load it into a model freshly prepared as the run that "
                         "saved it was")
    if state.dense_cost is None and not state.version:
        Objective(module)  # records the prepared model's cost before the removals change it
    ref = module.meta.get(PRUNER)
    pruner = ref() if ref is not None else None
    for s in saved[len(have):]:
        keep = {int(g): np.asarray(k, dtype=bool) for g, k in s["keep"].items()}
        drop, layers = {g: ~k for g, k in keep.items()}, set(s["layers"])
        if pruner is not None:  # its optimizer and counters follow
            pruner.remove(drop, layers, verify=False, step=int(s["step"]))
        else:
            live_compaction.remove(module, drop, layers, None, verify=False, step=int(s["step"]))


def install(gated: fx.GraphModule) -> None:
    """Make ``gated``'s state dict carry its removals, and its ``load_state_dict`` replay them."""
    gated.register_state_dict_post_hook(_save_hook)
    gated.register_load_state_dict_pre_hook(_load_hook)
