"""The verbs users meet: ``prepare`` (trace + analyze + gate) and ``convert`` (compact).

Example::

    >>> gated = fxprune.prepare(model, (x,), fxprune.PruneConfig(total_steps=1000))
    >>> # ... train with fxprune.Pruner ...
    >>> compact = fxprune.convert(gated.eval())
    >>> torch.allclose(compact(x), gated(x), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import fnmatch
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from . import resume
from .config import PruneConfig
from .distributed import sync_buffers
from .gates import GateBank, GateNorm, GateRead, LayerGateApply, bank_structure, group_floors, read_index
from .passes import Compact, InsertGates, TraceError, analyze, front_end_of, trace
from .passes.analysis import unread_functions
from .passes.channel_graph import ChannelGraph
from .passes.errors import exception_line
from .passes.insert_gates import strip_gate_nodes
from .passes.surgery import copy_graph, copy_module, replace_tensor, skeleton
from .passes.trace import FRONT_END_META, LEAVES_META, bind_inputs, forward_names, restore_buffers
from .shaping import role_classes
from .state import COMPACT, STATE, CompactOrigin, GateLayout, PruneState, decisions, gate_bank, run_example, state_of

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


def _input_dims(model: nn.Module, inputs: list[Any], batch_dim: int | Sequence[int | None] | None) -> list[int | None]:
    """The batch dim of every input: ``batch_dim`` of every tensor input whose size there is
    the first one's (an int), or one per input (a sequence)."""
    if batch_dim is None or isinstance(batch_dim, int):
        dims, size = [], None
        for t in inputs:
            d = batch_dim if isinstance(t, torch.Tensor) and batch_dim is not None and -t.dim() <= batch_dim < t.dim() \
                else None
            if d is not None and size is not None and t.shape[d] != size:
                d = None
            if d is not None and size is None:
                size = t.shape[d]
            dims.append(d)
        return dims
    dims = list(batch_dim)
    if len(dims) != len(inputs):
        raise ValueError(f"batch_dim gives {len(dims)} dims for the {len(inputs)} inputs of {type(model).__name__}."
                         "forward; give one per input (None: no batch dim)")
    return dims


def _check_model(model: nn.Module) -> None:
    """Refuse wrappers and models without real parameters, saying what to pass instead."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxprune.prepare expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f"prepare got a {type(model).__name__} wrapper: pass the module it wraps (model.module), "
                        "and wrap the gated model afterwards")
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise TypeError("prepare got a torch.compile'd module: pass the original module (model._orig_mod) and "
                        "compile the gated model instead (torch.compile(gated))")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if meta:
        raise ValueError(
            f"the model's tensors are on the meta device ({', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}): "
            "materialise them first (model.to_empty(device='cpu'), then initialise or load the weights)")


def _check_dtypes(model: nn.Module, values: list[Any]) -> None:
    """Refuse a floating example input in another dtype than the model's floating
    parameters: the stored example is run in the model's dtype later (FLOP counts, the
    removal's check), so the graph would be traced for inputs the model never gets."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for name, v in zip(forward_names(model, len(values)), values):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype:
            raise TypeError(f"the example input '{name}' is {v.dtype} and {type(model).__name__}'s parameters are "
                            f"{dtype}: give the example in the dtype the model will be trained with (or convert the "
                            "model first, model.to(dtype))")


def _excluded(cg: ChannelGraph, patterns: tuple[str, ...]) -> set[int]:
    """Freeze every group an excluded module produces or reads; return the branches that
    contain one (they get no layer gate)."""
    if not patterns:
        return set()
    hit = lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)
    owners = sorted({b.owner for b in cg.bindings})
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(o, p) for o in owners)]
    if unmatched:  # a misspelt name would otherwise exclude nothing, silently
        raise ValueError(f"PruneConfig.exclude: {unmatched} name no layer the analysis found; layers are named by "
                         f"their module paths, for example {owners[:6]} (patterns as fnmatch takes them, e.g. "
                         "'model.layers.*.mlp.*')")
    for b in cg.bindings:
        if hit(b.owner):
            g = cg.group_of(b.space)
            why = f"module '{b.owner}' is excluded (PruneConfig.exclude)"
            if why not in g.frozen:
                g.frozen.append(why)
    return {br.id for br in cg.branches.values() if any(hit(o) for o, s in cg.layer_outputs
                                                           if s in cg.spaces and cg.spaces[s].node in br.nodes)}


#: held while ``prepare`` traces: torch.fx's symbolic tracer patches ``nn.Module.__call__`` and
#: torch.export its dispatch modes for the whole process while they run, so two prepares at
#: once break each other (a model running in another thread meanwhile is not safe either)
_TRACING = threading.RLock()

#: ``prepare`` warns when less than this share of the conv/linear output channels is prunable
LOW_PRUNABLE_SHARE = 0.25


def _warn_if_little_prunable(model: nn.Module, cg: ChannelGraph) -> None:
    """Warn, naming the main reasons, when the analysis leaves little of the model prunable."""
    prunable, total = cg.prunable_share()
    if not total or prunable >= LOW_PRUNABLE_SHARE * total:
        return
    reasons = "; ".join(f"{why} ({n} channels)" for why, n in list(cg.frozen_reasons().items())[:3])
    warnings.warn(
        f"only {prunable} of the {total} output channels of {type(model).__name__}'s conv and linear layers "
        f"({100 * prunable / total:.0f} %) are prunable; the main reasons: {reasons or 'none recorded'}. "
        "fxprune.report.tables.groups_table(fxprune.channel_graph(gated)) lists every frozen group and why", stacklevel=3)


def _kept_whole(gm: fx.GraphModule) -> str:
    """What a symbolic trace kept whole and no rule reads: submodules that could not be
    traced (leaves) and ``torch.fx.wrap``'d functions; empty when nothing."""
    if front_end_of(gm)[0] != "symbolic":
        return ""
    leaves, wrapped = gm.meta.get(LEAVES_META, {}), unread_functions(gm)
    parts = []
    if leaves:
        first = next(iter(leaves))
        parts.append(f"{len(leaves)} submodule(s) ('{first}': {leaves[first].split(' at ')[0]})")
    if wrapped:
        parts.append(", ".join(wrapped))
    return " and ".join(parts)


def pick_front_end(model: nn.Module, gm: fx.GraphModule, cg: ChannelGraph, values: tuple, dims: Any,
                    mode: str) -> tuple[fx.GraphModule, ChannelGraph]:
    """Where symbolic tracing kept submodules or functions whole, trace with
    ``torch.export`` too (it reads into them) and keep the graph with the larger prunable
    share; ``front_end_of`` records the choice and the shares."""
    kept = _kept_whole(gm)
    if not kept:
        return gm, cg
    try:
        other = trace(model, values, mode=mode, front_end="export")
    except (TraceError, ValueError) as exc:
        gm.meta[FRONT_END_META] = ("symbolic", f"symbolic tracing kept {kept} whole; torch.export failed: "
                                               f"{exception_line(exc, with_type=False, limit=300)}")
        return gm, cg
    other_cg = analyze(other, dims)
    (a, n), (b, m) = cg.prunable_share(), other_cg.prunable_share()
    shares = f"{100 * b / max(m, 1):.1f} % prunable through torch.export against {100 * a / max(n, 1):.1f} %"
    if b / max(m, 1) <= a / max(n, 1):
        gm.meta[FRONT_END_META] = ("symbolic", f"symbolic tracing kept {kept} whole; {shares}")
        return gm, cg
    other.meta[FRONT_END_META] = ("export", f"symbolic tracing kept {kept} whole; {shares}")
    return other, other_cg


def prepare(model: nn.Module, example_inputs: tuple[Any, ...] | torch.Tensor, config: PruneConfig | None = None, *,
            kwargs: dict[str, Any] | None = None, batch_dim: int | Sequence[int | None] | None = 0,
            mode: str = "both", front_end: str = "auto", inplace: bool = False) -> fx.GraphModule:
    """Trace ``model``, analyze its channel dependencies and insert gates.

    The example inputs are bound to ``forward`` like a call ``model(*example_inputs,
    **kwargs)``; parameters left out take their defaults, and those that hold no tensor
    are specialised to their value (see :func:`fxprune.trace`). A forward that takes
    ``**kwargs`` (transformers' models) is bound by its named parameters, and a
    ``use_cache`` left out is ``False`` (a generation cache is not trained). The gated
    model returns what the model returns (a ``ModelOutput`` stays one). ``batch_dim`` is the dim
    of the inputs that indexes examples: one for all inputs, or one per ``forward``
    parameter (None: no batch dim); e.g. ``batch_dim=1`` for sequence-first ``[T, B, C]``
    inputs. Gates sample one mask per example along it.

    ``mode`` is the forward traced: ``"both"`` (default) traces the training and the eval
    forward and refuses a model whose two differ (training-only code such as auxiliary
    heads), naming where; ``"train"`` or ``"eval"`` gates the forward of that mode (used in
    both modes). Functional dropout follows the gated model's mode either way.

    ``front_end``: ``"auto"`` (default) traces with ``torch.fx`` symbolic tracing and, when
    that fails (a forward that branches on shapes or values), with ``torch.export``;
    where it keeps submodules whole (transformers' models) or a ``torch.fx.wrap``'d
    function no rule reads (torchvision's Swin attention), with both, and keeps the graph
    with the larger prunable share;
    ``"symbolic"`` or ``"export"`` takes only that one. :func:`fxprune.front_end_of`
    tells which one a gated model came from, and why.

    ``prepare`` calls in several threads run one at a time. While one traces, no other thread
    may run a model: torch.fx's symbolic tracer patches ``nn.Module.__call__`` process-wide
    (a training loop in another thread would be traced, or fail), so prepare before
    starting other threads' work, or in another process.

    The gated model works on a copy of ``model`` (``inplace=False``): the caller's model
    is never changed, live removal included. ``inplace=True`` shares its modules and
    parameters instead (no copy; the model is then changed by training and removal).
    """
    config = config or PruneConfig()
    _check_model(model)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception:
            model = copy_module(model)
    values, _ = bind_inputs(model, _as_tuple(example_inputs), kwargs)
    _check_dtypes(model, values)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with _TRACING:  # one prepare at a time in a process: both front ends patch process-wide state
            return _prepare(model, values, config, batch_dim, mode, front_end)
    finally:  # prepare's own runs (tracing, shapes, checks) leave the model's buffers as they were
        restore_buffers(model, buffers)


def _prepare(model: nn.Module, values: list[Any], config: PruneConfig, batch_dim: int | Sequence[int | None] | None,
             mode: str, front_end: str) -> fx.GraphModule:
    dims = _input_dims(model, values, batch_dim)
    gm = None
    doubled = _two_examples(tuple(values), dims)
    if doubled is not None:
        try:
            gm = trace(model, doubled, mode=mode, front_end=front_end)
        except ValueError:  # the model only runs with one example: analyse it as it is
            gm = None
    gm = gm or trace(model, tuple(values), mode=mode, front_end=front_end)
    cg = analyze(gm, dims)
    if front_end == "auto":
        gm, cg = pick_front_end(model, gm, cg, doubled or tuple(values), dims, mode)
    if config.units:
        _warn_if_little_prunable(model, cg)
    no_layer_gate = _excluded(cg, config.exclude)
    groups = {g.id: g.num_units for g in cg.prunable_groups} if config.units else {}
    branches = sorted(set(cg.branches) - no_layer_gate) if config.layers else []
    layout = GateLayout.build(groups, branches)
    bank = GateBank(layout.size, config.theta_init, config.estimator, cg.inputs.get(cg.batch_input))
    bank.floors = group_floors(cg, list(groups), config.min_share, config.min_units)
    bank.roles = role_classes(cg, list(groups))
    InsertGates(
        cg, list(groups), branches, bank,
        read=lambda r: GateRead(read_index(cg, layout.units, cg.spaces[r.space].group, r.space), r.dim, r.batch_dim,
                                cg.spaces[r.space].group, r.space),
        layer=lambda br: LayerGateApply(layout.layers[br.id], br.batch_dim, br.id),
        norm=lambda r, nc: GateNorm(read_index(cg, layout.units, cg.spaces[r.space].group, r.space), r.dim,
                                    r.batch_dim, cg.spaces[r.space].group, r.space, nc.kind, nc.eps, nc.groups),
    )(gm)
    bank.set_structure(*bank_structure(cg, layout.units, layout.size, bank.floors))
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    gm.meta[STATE] = PruneState(cg, config, layout, _one_example(tuple(values), dims), dict(zip(placeholders, dims)),
                                origin=_origin(model), dense_graph=cg, dense_layout=layout)
    resume.install(gm)  # its state dict carries its live removals, and loading one replays them
    return gm


def _origin(model: nn.Module) -> tuple[type, Any] | None:
    """The model's class and a copy of its ``config`` (transformers' models: what
    :func:`fxprune.hf.to_pretrained` builds the stock model from), or None."""
    config = getattr(model, "config", None)
    try:
        return type(model), copy.deepcopy(config)
    except Exception:
        return None


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
    sync_buffers(gated)  # under torch.distributed: rank 0's BatchNorm statistics on every process
    unit_keep, drop = decisions(gated)
    expected = run_example(gated, state.example)
    graph = copy_graph(gated.graph)
    strip_gate_nodes(graph)
    compact = fx.GraphModule(skeleton(gated), graph, type(gated).__name__)
    compact._tracer_cls = gated._tracer_cls  # torch.load rebuilds it as the gated model would be (passes.reload)
    Compact(state.graph, unit_keep, drop, check=(state.example, expected))(compact)
    originals = {id(t) for t in [*gated.parameters(), *gated.buffers()]}
    copies: dict[int, torch.Tensor] = {}
    for name, t in [*compact.named_parameters(remove_duplicate=False), *compact.named_buffers(remove_duplicate=False)]:
        if id(t) in originals:
            if id(t) not in copies:  # one copy per tensor: tied weights stay tied
                copies[id(t)] = nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(t, nn.Parameter) \
                    else t.detach().clone()
            replace_tensor(compact, name, copies[id(t)])
    compact.meta[COMPACT] = CompactOrigin(state.graph, unit_keep, set(drop), state.origin, state.example)
    return compact
