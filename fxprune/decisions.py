"""What the gates decided, as a small JSON file that can be applied to a fresh copy of the
model: decisions learnt in one run re-applied to other weights.

The record lists, for every unit gate of the model as prepared (before any removal), the
units kept, counting both the units live removal took and the units whose theta is now
below 0.5, and for every layer gate whether its branch stays. Groups are checked by their
size and the layers that produce them, so a file is never applied to another model.

Example::

    >>> path = save_decisions("decisions.json", gated, pruner)
    >>> fresh = fxprune.prepare(make_model(), (x,), config)
    >>> fresh = apply_decisions(fresh, "decisions.json")
    >>> compact = fxprune.convert(fresh.eval())
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import fx

from .files import writable
from .passes.channel_graph import ChannelGraph
from .state import GateLayout, decisions, set_decisions, state_of


class Dense(Protocol):
    """What the decisions read of a Pruner (no import of it: the Pruner imports this module):
    the analysis and gate layout the model was prepared with."""

    dense_graph: ChannelGraph
    dense_layout: GateLayout


__all__ = ["decisions_record", "save_decisions", "apply_decisions", "FORMAT"]

FORMAT = "fxprune-decisions-1"


def _producers(state_graph, group: int) -> list[str]:
    return sorted({o for o, s in state_graph.layer_outputs if s in state_graph.spaces and state_graph.spaces[s].group == group})


def decisions_record(gated: fx.GraphModule, pruner: Dense | None = None) -> dict[str, Any]:
    """The decisions of ``gated`` over the units it was prepared with (``pruner``, its
    Pruner, holds the analysis of the model before its live removals; without one, none
    may have been made)."""
    state = state_of(gated)
    if pruner is None and state.removals:
        raise ValueError(f"{type(gated).__name__} has had {len(state.removals)} live removals: pass its Pruner, which "
                         "holds the units the model was prepared with, to record the decisions over them")
    dense_graph = pruner.dense_graph if pruner is not None else state.graph
    dense_layout = pruner.dense_layout if pruner is not None else state.layout
    alive = {g: np.arange(sl.stop - sl.start) for g, sl in dense_layout.units.items()}
    dropped: set[int] = set()
    for record in state.removals:
        for g, keep in record.keep.items():
            alive[g] = alive[g][np.asarray(keep, dtype=bool)]
        dropped |= set(record.layers)
    keep_now, drop_now = decisions(gated)
    groups = {}
    for g, sl in dense_layout.units.items():
        kept = alive[g][keep_now[g]] if g in keep_now else np.zeros(0, dtype=np.int64)
        groups[str(g)] = {"units": sl.stop - sl.start, "kept": kept.tolist(), "layers": _producers(dense_graph, g)}
    branches = {str(b): {"kept": b not in dropped and b in state.layout.layers and b not in drop_now,
                         "add": dense_graph.branches[b].add} for b in dense_layout.layers}
    return {"format": FORMAT, "model": type(gated).__name__, "groups": groups, "branches": branches}


def save_decisions(path: str | os.PathLike, gated: fx.GraphModule, pruner: Dense | None = None) -> Path:
    """Write :func:`decisions_record` to ``path`` as JSON."""
    path = writable(path, "the decisions")
    path.write_text(json.dumps(decisions_record(gated, pruner), indent=1))
    return path


def apply_decisions(gated: fx.GraphModule, source: str | os.PathLike | dict[str, Any]) -> fx.GraphModule:
    """Set the thetas of a freshly prepared ``gated`` model to the saved decisions (1 for a
    kept unit or branch, 0 otherwise); ``convert(gated)`` then builds the pruned model with
    ``gated``'s weights. Refuses a record of another model, naming the first mismatch."""
    where = "the decisions" if isinstance(source, dict) else f"'{source}'"
    if isinstance(source, dict):
        record = source
    else:
        try:
            record = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {where} as fxprune decisions: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{where} is not an fxprune decisions file (written by fxprune.decisions.save_decisions)")
    state = state_of(gated)
    layout, cg = state.layout, state.graph
    for key in ("groups", "branches"):
        if not isinstance(record.get(key), dict):
            raise ValueError(f"{where} has no '{key}' table (a mapping): it is not a whole fxprune decisions file")
    if set(record["groups"]) != {str(g) for g in layout.units} or set(record["branches"]) != {str(b) for b in layout.layers}:
        raise ValueError(f"{where} was made for another model or config ({len(record['groups'])} unit gates and "
                         f"{len(record['branches'])} layer gates; this model has {len(layout.units)} and "
                         f"{len(layout.layers)}): prepare the same model with the same config first")
    units = {}
    for g, sl in layout.units.items():  # every entry is checked before any theta changes
        saved = record["groups"][str(g)]
        n = sl.stop - sl.start
        missing = [k for k in ("units", "kept", "layers") if not isinstance(saved, dict) or k not in saved]
        if missing:
            raise ValueError(f"{where}: group {g} has no '{missing[0]}'")
        if saved["units"] != n or saved["layers"] != _producers(cg, g):
            raise ValueError(f"{where} does not fit group {g} of this model ({saved['units']} units of "
                             f"{', '.join(map(str, saved['layers']))}; this model's: {n} of "
                             f"{', '.join(_producers(cg, g))})")
        units[g] = _kept_units(saved["kept"], n, f"{where}: group {g}")
    layers = {}
    for b in layout.layers:
        saved = record["branches"][str(b)]
        kept = saved.get("kept") if isinstance(saved, dict) else None
        if not isinstance(kept, bool):
            raise ValueError(f"{where}: branch {b}: 'kept' must be true or false, got {kept!r}")
        layers[b] = kept
    set_decisions(gated, units, layers)
    return gated


def _kept_units(kept: Any, n: int, where: str) -> np.ndarray:
    """The keep mask of a group of ``n`` units from its saved ``kept`` list of unit indices,
    refusing anything else (a bool or a float is not an index, -1 is not the last unit)."""
    if not isinstance(kept, list):
        raise ValueError(f"{where}: 'kept' must be a list of unit indices, got {kept!r}")
    keep = np.zeros(n, dtype=bool)
    for i in kept:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"{where}: 'kept' holds {i!r}, not a unit index in [0, {n})")
        if keep[i]:
            raise ValueError(f"{where}: 'kept' lists unit {i} twice")
        keep[i] = True
    return keep
