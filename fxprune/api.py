"""The verbs users meet: ``prepare`` (trace + analyze + gate) and ``convert`` (compact).

Example::

    >>> gated = fxprune.prepare(model, (x,), fxprune.PruneConfig(gamma=10.0))
    >>> ...                                   # train with fxprune.Pruner
    >>> compact = fxprune.convert(gated.eval())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from .config import PruneConfig
from .gates import GateBank, GateRead, LayerGateApply, bank_structure, read_index
from .passes import Compact, InsertGates, analyze, trace
from .passes.channel_graph import ChannelGraph
from .passes.insert_gates import strip_gate_nodes
from .passes.surgery import replace_tensor, skeleton
from .state import STATE, GateLayout, PruneState, decisions, gate_bank, run_example, state_of

__all__ = ["prepare", "convert", "channel_graph", "config_of", "decisions", "gate_bank", "run_example"]


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _one_example(inputs: tuple[Any, ...], dims: list[int | None]) -> tuple[Any, ...]:
    """The first example of every input that has a batch dim; other inputs as they are."""
    return tuple(t.detach().narrow(d, 0, 1).clone() if isinstance(t, torch.Tensor) and d is not None else t
                 for t, d in zip(inputs, dims))


def _two_examples(inputs: tuple[Any, ...], dims: list[int | None]) -> tuple[Any, ...] | None:
    """A batch of one example made two (the first one repeated), or None if it is larger:
    with a batch of one, a batch dim of size 1 cannot be told from any other."""
    sizes = {t.shape[d] for t, d in zip(inputs, dims) if isinstance(t, torch.Tensor) and d is not None}
    if sizes != {1}:
        return None
    return tuple(torch.cat([t, t], d) if isinstance(t, torch.Tensor) and d is not None else t for t, d in zip(inputs, dims))


def _input_dims(model: nn.Module, inputs: tuple[Any, ...], batch_dim: int | Sequence[int | None] | None) -> list[int | None]:
    if batch_dim is None or isinstance(batch_dim, int):
        return [batch_dim if isinstance(t, torch.Tensor) and batch_dim is not None and -t.dim() <= batch_dim < t.dim()
                else None for t in inputs]
    dims = list(batch_dim)
    if len(dims) != len(inputs):
        raise ValueError(f"batch_dim gives {len(dims)} dims for {len(inputs)} example inputs of "
                         f"{type(model).__name__}; give one per input (None: no batch dim)")
    return dims


def prepare(model: nn.Module, example_inputs: tuple[Any, ...] | torch.Tensor, config: PruneConfig | None = None, *,
            batch_dim: int | Sequence[int | None] | None = 0) -> fx.GraphModule:
    """Trace ``model``, analyze its channel dependencies and insert gates.

    ``batch_dim`` is the dim of the example inputs that indexes examples: one for all
    inputs, or one per input (None for an input without one); e.g. ``batch_dim=1`` for
    sequence-first ``[T, B, C]`` inputs. Gates sample one mask per example along it.
    Returns a gated ``GraphModule`` sharing ``model``'s parameters; its
    :class:`~fxprune.state.PruneState` (``fxprune.state.state_of(gated)``) holds the
    analysis it was built from.
    """
    config = config or PruneConfig()
    inputs = _as_tuple(example_inputs)
    dims = _input_dims(model, inputs, batch_dim)
    gm = None
    doubled = _two_examples(inputs, dims)
    if doubled is not None:
        try:
            gm = trace(model, doubled)
        except ValueError:  # the model only runs with one example: analyse it as it is
            gm = None
    gm = gm or trace(model, inputs)
    cg = analyze(gm, dims)
    groups = {g.id: g.num_units for g in cg.prunable_groups} if config.units else {}
    branches = sorted(cg.branches) if config.layers else []
    layout = GateLayout.build(groups, branches)
    bank = GateBank(layout.size, config.theta_init, config.estimator, cg.inputs.get(cg.batch_input))
    InsertGates(
        cg, list(groups), branches, bank,
        read=lambda r: GateRead(read_index(cg, layout.units, cg.spaces[r.space].group, r.space), r.dim, r.batch_dim,
                                cg.spaces[r.space].group, r.space),
        layer=lambda br: LayerGateApply(layout.layers[br.id], br.batch_dim, br.id),
    )(gm)
    bank.set_structure(*bank_structure(cg, layout.units, layout.size))
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    gm.meta[STATE] = PruneState(cg, config, layout, _one_example(inputs, dims), dict(zip(placeholders, dims)))
    return gm


def config_of(gated: fx.GraphModule) -> PruneConfig:
    """The config ``gated`` was prepared with."""
    return state_of(gated).config


def channel_graph(gated: fx.GraphModule) -> ChannelGraph:
    """The analysis of a gated model as it is now (after any live removal)."""
    return state_of(gated).graph


def convert(gated: fx.GraphModule) -> fx.GraphModule:
    """The compact model: a plain ``GraphModule`` equal to ``gated.eval()``, gates folded away.

    Channels whose gate is off (``theta < 0.5``) are sliced out of every parameter,
    buffer and shape constant; branches whose layer gate is off are deleted. The compact
    model owns its tensors (nothing is shared with ``gated``), and ``gated`` is not
    copied first: the extra memory is the compact model's own size. Its outputs are
    checked against ``gated``'s on the stored example input.
    """
    state = state_of(gated)
    unit_keep, drop = decisions(gated)
    expected = run_example(gated, state.example)
    graph = fx.Graph()
    out = graph.graph_copy(gated.graph, {})
    graph.output(out)
    strip_gate_nodes(graph)
    compact = fx.GraphModule(skeleton(gated), graph, type(gated).__name__)
    Compact(state.graph, unit_keep, drop, check=(state.example, expected))(compact)
    originals = {id(t) for t in [*gated.parameters(), *gated.buffers()]}
    copies: dict[int, torch.Tensor] = {}
    for name, t in [*compact.named_parameters(remove_duplicate=False), *compact.named_buffers(remove_duplicate=False)]:
        if id(t) in originals:
            if id(t) not in copies:  # one copy per tensor: tied weights stay tied
                copies[id(t)] = nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(t, nn.Parameter) \
                    else t.detach().clone()
            replace_tensor(compact, name, copies[id(t)])
    return compact
