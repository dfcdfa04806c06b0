"""The verbs users meet: ``prepare`` (trace + analyze + gate) and ``convert`` (compact)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .config import PruneConfig
from .passes import CHANNEL_GRAPH, ChannelGraph, Compact, InsertGates, StripGates, analyze, trace
from .passes.insert_gates import LAYERS, UNITS, gate_modules

__all__ = ["prepare", "convert", "channel_graph", "gate_state", "config_of"]

#: ``gm.meta`` keys: the config a gated model was prepared with, and its example inputs.
CONFIG, EXAMPLE = "fxprune_config", "fxprune_example_inputs"


def prepare(model: nn.Module, example_inputs: tuple[Any, ...] | torch.Tensor, config: PruneConfig | None = None) -> fx.GraphModule:
    """Trace ``model``, analyze its channel dependencies and insert gates.

    Returns a gated ``GraphModule`` sharing ``model``'s parameters; its
    ``meta["fxprune_channel_graph"]`` is the analysis it was built from.
    """
    config = config or PruneConfig()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace(model, example_inputs)
    cg = analyze(gm)
    gated = InsertGates(cg, units=config.units, layers=config.layers, theta_init=config.theta_init,
                        estimator=config.estimator)(gm).graph_module
    gated.meta[CONFIG] = config
    gated.meta[EXAMPLE] = tuple(t[:1].detach().clone() if isinstance(t, torch.Tensor) else t for t in example_inputs)
    return gated


def config_of(gated: fx.GraphModule) -> PruneConfig:
    """The config ``gated`` was prepared with."""
    channel_graph(gated)
    return gated.meta.get(CONFIG) or PruneConfig()


def channel_graph(gated: fx.GraphModule) -> ChannelGraph:
    """The analysis a gated model was built from."""
    try:
        return gated.meta[CHANNEL_GRAPH]
    except (AttributeError, KeyError):
        raise ValueError("not a gated model: build it with fxprune.prepare(model, example_inputs)") from None


def gate_state(gated: fx.GraphModule) -> tuple[dict[int, np.ndarray], set[int]]:
    """Deterministic gate decisions: kept units per group id, and dropped branch ids."""
    units = gate_modules(gated, UNITS)
    layers = gate_modules(gated, LAYERS)
    unit_keep = {int(k[1:]): g.keep() for k, g in units.items()}
    drop = {int(k[1:]) for k, g in layers.items() if not g.keep()[0]}
    return unit_keep, drop


def convert(gated: fx.GraphModule) -> fx.GraphModule:
    """The compact model: a plain ``GraphModule`` equal to ``gated.eval()``, gates folded away.

    Channels whose gate is off (``theta < 0.5``) are sliced out of every parameter,
    buffer and shape constant; branches whose layer gate is off are deleted.
    """
    cg = channel_graph(gated)
    unit_keep, drop = gate_state(gated)
    gm = copy.deepcopy(gated, memo={id(cg): cg})
    for key in (CHANNEL_GRAPH, CONFIG, EXAMPLE):
        gm.meta.pop(key, None)
    StripGates()(gm)
    Compact(cg, unit_keep, drop)(gm)
    return gm
