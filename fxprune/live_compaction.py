"""Live removal: compact a gated model in the middle of training, as one transaction.

:func:`remove` slices, with the same indices, the parameters' data **and** gradients (the
same ``Parameter`` objects, so the optimizer keeps working), the optimizer state through
its adapter (:mod:`fxprune.optim_state`), the thetas, the gate reads' indices and the
ChannelGraph; it rewrites the graph and deletes removed branches and their parameters
(which leave the optimizer). Its postcondition runs the stored example before and after:
removing structures whose gates are off must not change the deterministic model. Either
all of it happens or, on any error, none of it: the model, the optimizer and the state
are restored as they were.

Example::

    >>> group = min(state_of(gated).layout.units)
    >>> theta_of(gated, UnitGate(group)).data[:2] = 0.0           # two units switched off
    >>> drop = np.arange(theta_of(gated, UnitGate(group)).numel()) < 2
    >>> record = remove(gated, {group: drop}, set(), optimizer)
    >>> record.units == {group: 2}, record.version, record.index_map(UnitGate(group))[:3]
    (True, 1, array([-1, -1,  0]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from . import distributed, optim_state
from .cost import counted_run
from .gates import GateRead, LayerGateApply, bank_structure, read_index
from .passes.channel_graph import ChannelGraph
from .passes.compact import EQUIVALENCE_RTOL, check_nonempty, max_relative_error, plan_slices, rewrite_graph
from .passes.restrict import restrict
from .passes.surgery import copy_graph, delete_unreferenced, index_tensor, refresh_module, set_data
from .passes.units import floor_keep
from .state import PruneState, Removal, gate_bank, run_example, state_of

__all__ = ["Removal", "RemovalError", "remove", "describe_removal"]


class RemovalError(RuntimeError):
    """A live removal would change what the model computes; nothing was removed."""


class _Snapshot:
    """References to everything a removal may change, to put back on failure."""

    def __init__(self, gated: fx.GraphModule, optimizer: torch.optim.Optimizer | None, state: PruneState) -> None:
        self.gated, self.optimizer, self.state = gated, optimizer, state
        self.graph = gated.graph
        self.modules = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules))
                        for m in gated.modules()]
        self.tensors = [(t, t.data, t.grad) for t in {id(t): t for t in [*gated.parameters(), *gated.buffers()]}.values()]
        self.fields = (state.graph, state.layout, state.version, list(state.removals))
        if optimizer is not None:
            self.groups = [list(g["params"]) for g in optimizer.param_groups]
            self.opt_state = {p: dict(s) for p, s in optimizer.state.items()}

    def restore(self) -> None:
        for m, attrs, params, buffers, children in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for d, old in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
                d.clear()
                d.update(old)
        for t, data, grad in self.tensors:
            if t.data is not data:
                set_data(t, data)
            t.grad = grad
        if self.gated.graph is not self.graph:
            self.gated.graph = self.graph
        self.gated.recompile()
        self.state.graph, self.state.layout, self.state.version, self.state.removals = self.fields
        if self.optimizer is not None:
            for g, params in zip(self.optimizer.param_groups, self.groups):
                g["params"] = params
            self.optimizer.state.clear()
            for p, s in self.opt_state.items():
                self.optimizer.state[p].update(s)


def _floored_keep(gated: fx.GraphModule, state: PruneState, unit_drop: dict[int, np.ndarray],
                  exact: bool = False, shape: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[int, np.ndarray]:
    """Per gated group: the units kept, with every unit eval mode keeps (its gate on, or the
    best of a channel dimension whose gates are all off) kept too, so the deterministic
    model is unchanged. ``exact``: the masks as given (replaying a recorded removal on a
    fresh model, whose thetas say nothing yet)."""
    layout, bank = state.layout, gate_bank(gated)
    keep = torch.ones(layout.size, dtype=torch.bool)
    for gid, drop in unit_drop.items():
        if gid not in layout.units:
            raise ValueError(f"group {gid} has no unit gate (gated groups: {sorted(layout.units)})")
        sl = layout.units[gid]
        drop = np.asarray(drop, dtype=bool)
        if drop.shape != (sl.stop - sl.start,):
            raise ValueError(f"the drop mask of group {gid} has {drop.size} entries for its {sl.stop - sl.start} units")
        keep[sl] = torch.as_tensor(~drop)
    if exact:
        keep = keep.numpy()
        return {gid: keep[layout.units[gid]] for gid in unit_drop if not keep[layout.units[gid]].all()}
    theta = bank.theta.detach().cpu()
    on = ~keep & (theta >= 0.5)
    if on.any():
        where = [f"group {g}: units {np.flatnonzero(on[sl].numpy()).tolist()[:8]}" for g, sl in layout.units.items()
                 if on[sl].any()]
        raise RemovalError(f"these units have their gates on (theta >= 0.5), so removing them would change the "
                           f"model's output: {'; '.join(where)}")
    keep |= bank.deterministic().cpu() > 0  # the best unit of a dimension whose gates are all off stays
    keep = floor_keep(keep, theta, bank.segments.cpu(), bank.least.cpu())
    if shape is not None:  # widths rounded up and alike in repeated blocks: the extra units stay gated (off)
        keep = shape(keep, theta) > 0
    keep = keep.numpy()
    return {gid: keep[layout.units[gid]] for gid in unit_drop if not keep[layout.units[gid]].all()}


def _sync_gates(gated: fx.GraphModule, state: PruneState, keep_flat: np.ndarray) -> None:
    """Slice the thetas to ``keep_flat`` and point every gate at the new layout."""
    bank = gate_bank(gated)
    idx = torch.as_tensor(np.flatnonzero(keep_flat), device=bank.theta.device)
    theta = bank.theta
    new = theta.detach().index_select(0, idx).requires_grad_(theta.requires_grad)
    if theta.grad is not None:
        new.grad = theta.grad.index_select(0, idx)
    bank.theta = new
    bank.set_structure(*bank_structure(state.graph, state.layout.units, state.layout.size, bank.floors))
    for m in gated.modules():
        if isinstance(m, GateRead):
            m.set_index(read_index(state.graph, state.layout.units, m.group, m.space))
        elif isinstance(m, LayerGateApply):
            m.index = state.layout.layers[m.branch]


def _drop_from_optimizer(optimizer: torch.optim.Optimizer, gone: set[int]) -> None:
    """Take the parameters the removal deleted (``gone``: ids) out of the optimizer; every
    other parameter it trains (a separate head, a loss module) stays as it is."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in gone:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) not in gone]


def remove(gated: fx.GraphModule, unit_drop: dict[int, np.ndarray], layer_drop: set[int],
           optimizer: torch.optim.Optimizer | None = None, verify: bool = True, rtol: float = EQUIVALENCE_RTOL,
           shape: Callable[[Tensor, Tensor], Tensor] | None = None, step: int = 0,
           followers: Sequence[Callable[[Removal], Any]] = ()) -> Removal:
    """Remove units (``unit_drop[group]``: True = remove) and residual branches
    (``layer_drop``) from the live model, all or nothing, and return its :class:`Removal`
    record (also appended to the state's ``removals``). With ``verify``, structures whose
    gates are on cannot be removed (:class:`RemovalError`), the unit eval mode keeps for a
    dimension whose gates are all off stays, and the model's eval output on the stored
    example must stay the same. ``verify=False`` applies the masks as given (replaying a
    checkpoint's removals on a fresh model). ``shape(keep, theta)`` adds to the kept units
    what the widths must keep (:class:`fxprune.shaping.Shaper`). Each of ``followers`` is
    called with the record inside the transaction: an exception there (a derived cache
    that cannot follow) undoes the removal too. A follower may return a callable that
    undoes what it did (a copy it replaced): those of the followers before a failing one
    are called, last first. Whatever else is derived from the model
    re-derives from ``state.version`` and ``state.removals``, so this is safe to call
    without a Pruner, or beside one."""
    state = state_of(gated)
    distributed.check_forward(gated)
    cg, layout = state.graph, state.layout
    optimizer = optim_state.unwrap(optimizer) if optimizer is not None else None  # the one holding the state
    layer_drop = set(layer_drop)
    unknown = layer_drop - set(layout.layers)
    if unknown:
        raise ValueError(f"branches {sorted(unknown)} have no layer gate (gated branches: {sorted(layout.layers)})")
    theta = gate_bank(gated).theta.detach().cpu()
    on = [b for b in layer_drop if theta[layout.layers[b]] >= 0.5]
    if on and verify:
        raise RemovalError(f"the layer gates of branches {on} are on (theta >= 0.5), so removing them would change "
                           "the model's output")
    unit_keep = _floored_keep(gated, state, unit_drop, exact=not verify, shape=shape)
    effective = cg.effective_keep(unit_keep, layer_drop)
    check_nonempty(cg, effective, layer_drop)
    slices = plan_slices(cg, effective)
    tensors = dict([*gated.named_parameters(remove_duplicate=False), *gated.named_buffers(remove_duplicate=False)])
    sliced = {canon: next(tensors[n] for n in cg.params[canon].names if n in tensors) for canon in slices}
    new_state = {}
    if optimizer is not None:
        new_state = {canon: optim_state.plan_slices(optimizer, t, slices[canon])
                     for canon, t in sliced.items() if isinstance(t, nn.Parameter)}
    before = run_example(gated, state.example) if verify else None

    snapshot = _Snapshot(gated, optimizer, state)
    undos: list[Callable[[], Any]] = []
    try:
        graph = copy_graph(gated.graph)
        modules = dict(gated.named_modules())
        replaced, _ = rewrite_graph(graph, modules, cg, effective, layer_drop)
        owners, applied = set(), {}
        for canon, t in sliced.items():
            grad = index_tensor(t.grad, slices[canon]) if t.grad is not None else None
            set_data(t, index_tensor(t, slices[canon]))
            t.grad = grad
            if canon in new_state:
                optimizer.state[t].update(new_state[canon])
            names = [n for n in cg.params[canon].names if n in tensors]
            owners.update(n.rpartition(".")[0] for n in names)
            applied.update(dict.fromkeys(names, slices[canon]))
        for name in owners:
            refresh_module(modules[name], name in cg.depthwise)
        gated.graph = graph
        owned = {id(p): p for p in gated.parameters()}
        named_before = set(tensors)
        gone = delete_unreferenced(gated)
        gated.recompile()
        deleted = set(owned) - {id(p) for p in gated.parameters()}
        for i in deleted:  # a parameter list the user keeps (for clip_grad_norm_) reads no stale gradient
            owned[i].grad = None
        if optimizer is not None:
            _drop_from_optimizer(optimizer, deleted)
        state.graph = restrict(cg, effective, layer_drop, replaced, set(gone))
        state.layout, keep_flat = layout.restrict(effective, layer_drop, state.graph)
        _sync_gates(gated, state, keep_flat)
        state.version += 1
        counter, after = counted_run(gated, state.example)  # the FLOPs, and the output verify compares
        if verify:
            err = max_relative_error(after, before)
            if not err <= rtol:
                raise RemovalError(
                    f"removing these structures changes the model's output on the example (max relative error "
                    f"{err:.2e}): only structures whose gates are off (theta < 0.5) can be removed")
        now = {n for n, _ in [*gated.named_parameters(remove_duplicate=False), *gated.named_buffers(remove_duplicate=False)]}
        record = Removal(
            units={gid: int((~k).sum()) for gid, k in unit_keep.items()}, layers=sorted(layer_drop),
            keep={gid: k.tolist() for gid, k in unit_keep.items()}, flops=counter.get_total_flops(), step=step,
            version=state.version, theta_index=np.flatnonzero(keep_flat), before=layout, after=state.layout,
            slices={n: sl for n, sl in applied.items() if n in now}, deleted=tuple(sorted(named_before - now)))
        state.removals.append(record)
        for follow in followers:
            undo = follow(record)
            if callable(undo):
                undos.append(undo)
    except BaseException:
        for undo in reversed(undos):
            undo()
        snapshot.restore()
        raise
    return record


def describe_removal(cg: ChannelGraph, record: Removal) -> str:
    """What a removal took, by layer name: units per group (the layers producing them)
    and residual branches (their first layer)."""
    producers: dict[int, list[str]] = {}
    what: dict[int, str] = {}  # the factors of a product group: heads, head_dim entries
    for owner, s in cg.layer_outputs:
        if s in cg.spaces:
            g = cg.group_of(s)
            producers.setdefault(g.id, []).append(owner)
            for i, ids in enumerate(g.factor_ids()):
                for gid in ids:
                    producers.setdefault(gid, []).append(owner)
                    what[gid] = "head_dim entries" if i else "heads"
    parts = [f"{n} {what.get(g, 'units')} of {', '.join(dict.fromkeys(producers.get(g, [f'group {g}'])))}"
             for g, n in record.units.items() if n]
    for b in record.layers:
        inner = sorted(o for o, s in cg.layer_outputs if cg.spaces.get(s) and cg.spaces[s].node in cg.branches[b].nodes)
        parts.append(f"the residual branch of {inner[0] if inner else cg.branches[b].out}")
    return "removed " + "; ".join(parts) if parts else "removed nothing"
