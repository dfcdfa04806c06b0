"""A gated model's ``state_dict`` that describes itself: the live removals made so far
travel in it (one ``uint8`` tensor of JSON under :data:`REMOVALS_KEY`, so safetensors,
``torch.load(weights_only=True)`` and every framework's checkpoint carry it), and
``load_state_dict`` into a freshly prepared model replays them first, so the tensors it
then loads have the shapes they were saved with. With a Pruner on the model, the replay
goes through it (its optimizer and counters follow); the optimizer's own state dict,
loaded after, then has the pruned shapes. The Pruner's state (steps, check counters,
multipliers, FLOPs trained) travels too (:data:`PRUNER_KEY`): loaded into the model's
Pruner, or by the Pruner built on the model next.

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

__all__ = ["REMOVALS_KEY", "PRUNER_KEY", "install", "encode", "decode", "pruner_state", "load_pruner_state",
           "require_fresh"]

#: the state-dict key (under the gated model's prefix) of its removals
REMOVALS_KEY = "fxprune_removals"
#: the state-dict key of the state of the model's Pruner (steps, counters, multipliers), when it has one
PRUNER_KEY = "fxprune_pruner_state"
FORMAT = "fxprune-removals-1"


def _entry(r: Removal) -> dict:
    return {"step": int(r.step), "layers": [int(b) for b in r.layers],
            "keep": {str(g): [bool(k) for k in keep] for g, keep in r.keep.items()}}


def _begins(saved: list[dict], removals: list[Removal]) -> bool:
    """Whether the ``saved`` removals (state-dict entries) begin with ``removals``."""
    def key(entry: dict) -> tuple:
        return [int(b) for b in entry["layers"]], {int(g): [bool(k) for k in keep] for g, keep in entry["keep"].items()}

    return [key(_entry(r)) for r in removals] == [key(s) for s in saved[:len(removals)]]


def _tensor(value: Any) -> Tensor:
    return torch.tensor(list(json.dumps({"format": FORMAT, "value": value}).encode()), dtype=torch.uint8)


def _value(t: Tensor, key: str) -> Any:
    try:
        record = json.loads(bytes(t.cpu().to(torch.uint8).tolist()).decode())
        assert record["format"] == FORMAT
        return record["value"]
    except Exception as exc:  # any corruption reads as one error
        raise ValueError(f"the state dict's '{key}' is not what a gated model's state_dict wrote there; load a state "
                         "dict the gated model wrote") from exc


def encode(removals: list[Removal]) -> Tensor:
    """The removals as a ``uint8`` tensor (JSON): what the state dict carries."""
    return _tensor([_entry(r) for r in removals])


def decode(t: Tensor) -> list[dict]:
    """The removals :func:`encode` wrote; a clear error for anything else."""
    value = _value(t, REMOVALS_KEY)
    if not isinstance(value, list):
        raise ValueError(f"the state dict's '{REMOVALS_KEY}' is not a list of removals")
    return value


def pruner_state(pruner: Any) -> dict:
    """What :meth:`fxprune.Pruner.state_dict` returns (JSON-friendly)."""
    return {"steps": int(pruner.steps), "below": [int(b) for b in pruner.below], "trained_flops": float(pruner.trained_flops),
            "multipliers": pruner.budget.state_dict(),
            "removals": [{"step": r.step, "units": {int(g): int(n) for g, n in r.units.items()}, "layers": list(r.layers),
                          "flops": r.flops, "keep": {int(g): list(k) for g, k in r.keep.items()}} for r in pruner.removals]}


def require_fresh(pruner: Any, saved: list[dict] | None = None, steps: int = 0) -> None:
    """Raise unless ``pruner`` has trained no step (or exactly ``steps``: the same state
    loaded again) and had no removal but the first of ``saved``."""
    if pruner.steps not in (0, steps) or not _begins(saved or [], pruner.removals):
        raise RuntimeError("Pruner.load_state_dict needs a fresh pruner: build the gated model, optimizer and Pruner "
                           "again as at the start of training, then load the checkpoint")


def load_pruner_state(pruner: Any, state: dict) -> None:
    """What :meth:`fxprune.Pruner.load_state_dict` does."""
    require_fresh(pruner, state["removals"], int(state["steps"]))
    for saved in state["removals"][len(pruner.removals):]:
        keep = {int(g): np.asarray(k, dtype=bool) for g, k in saved["keep"].items()}
        pruner.remove({g: ~k for g, k in keep.items()}, set(saved["layers"]), verify=False, step=int(saved["step"]))
    pruner.steps = int(state["steps"])
    pruner.budget.load_state_dict(state.get("multipliers", {}))
    pruner.theta_step.step_t.fill_(pruner.steps)
    pruner.pruning.below = np.asarray(state["below"], dtype=np.int64)
    # a checkpoint from before "trained_flops" kept one entry per step
    pruner.trained_flops = state["trained_flops"] if "trained_flops" in state else sum(state["flops_per_step"])


def _pruner_of(module: fx.GraphModule) -> Any:
    ref = module.meta.get(PRUNER)
    return ref() if ref is not None else None


def _save_hook(module: fx.GraphModule, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state = module.meta.get(STATE)
    if isinstance(state, PruneState):
        state_dict[prefix + REMOVALS_KEY] = encode(state.removals)
        pruner = _pruner_of(module)
        if pruner is not None:
            state_dict[prefix + PRUNER_KEY] = _tensor(pruner_state(pruner))


def _load_hook(module: fx.GraphModule, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
               missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    t = state_dict.pop(prefix + REMOVALS_KEY, None)
    carried = state_dict.pop(prefix + PRUNER_KEY, None)
    if t is None:  # a state dict from before removals travelled in it, or of the dense model
        return
    saved = decode(t)
    state = state_of(module)
    if not _begins(saved, state.removals):
        raise ValueError(f"the state dict was saved after {len(saved)} live removals that do not begin with the "
                         f"{len(state.removals)} this model has had: load it into a model freshly prepared as the run "
                         "that saved it was")
    if state.dense_cost is None and not state.version:
        Objective(module)  # records the prepared model's cost before the removals change it
    pruner = _pruner_of(module)
    for s in saved[len(state.removals):]:
        keep = {int(g): np.asarray(k, dtype=bool) for g, k in s["keep"].items()}
        drop, layers = {g: ~k for g, k in keep.items()}, set(s["layers"])
        if pruner is not None:  # its optimizer and counters follow
            pruner.remove(drop, layers, verify=False, step=int(s["step"]))
        else:
            live_compaction.remove(module, drop, layers, None, verify=False, step=int(s["step"]))
    if carried is not None:  # the Pruner's state: loaded now, or by the Pruner built on this model next
        value = _value(carried, PRUNER_KEY)
        if pruner is not None:
            load_pruner_state(pruner, value)
        else:
            state.pending_pruner = value


def install(gated: fx.GraphModule) -> None:
    """Make ``gated``'s state dict carry its removals, and its ``load_state_dict`` replay them."""
    gated.register_state_dict_post_hook(_save_hook)
    gated.register_load_state_dict_pre_hook(_load_hook)
