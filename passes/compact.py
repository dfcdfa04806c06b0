"""Compaction: slice what the gates switched off, rewrite shape constants, delete dropped
branches.

The work is split so that ``convert`` and live removal share it:

* :func:`plan_slices`: which tensor (by canonical name) keeps which indices of which dim;
* :func:`rewrite_graph`: shape constants (view/reshape/expand/unflatten sizes, slice
  bounds, split sizes; ``chunk`` becomes ``split``) and dropped branches (their add
  becomes the stream), on any graph with the analysed node names, for instance a copy;
* :class:`Compact`: the pass ``convert`` runs on a model it owns: new sliced tensors,
  layer sizes re-derived, the graph rewritten, unreferenced tensors deleted. Its
  postcondition re-runs the example input and compares with the gated model's output.

Example::

    >>> from fxprune.passes import analyze, trace
    >>> gm = trace(model.eval(), (x,))
    >>> cg = analyze(gm)
    >>> g = cg.prunable_groups[0]
    >>> with torch.no_grad():
    ...     expected = gm(x)                  # what the model computes with every unit kept
    >>> Compact(cg, {g.id: np.ones(g.num_units, dtype=bool)}, set(), check=((x,), expected))(gm).modified
    True
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .channel_graph import ChannelGraph, Rewrite
from .op_classes import TRAILING_NORM, TRAILING_NORM_FUNCTIONS
from .sizes import set_sizes, sizes_of
from .surgery import (
    delete_unreferenced,
    index_tensor,
    is_impure,
    out_of_place,
    refresh_module,
    replace_tensor,
    writes_first_input,
)

__all__ = ["EQUIVALENCE_RTOL", "Compact", "plan_slices", "rewrite_graph", "check_nonempty", "CompactionError", "max_relative_error"]

#: the relative error (max |a - b| / max |b|) within which a compacted model computes what the gated one
#: computes on the stored example: convert and live removal both check against it
EQUIVALENCE_RTOL = 1e-4


class CompactionError(AssertionError):
    """The compacted model does not compute what the gated model computed."""


def check_nonempty(cg: ChannelGraph, unit_keep: dict[int, np.ndarray], drop: set[int]) -> None:
    """Raise ``ValueError`` if ``unit_keep`` empties a channel dimension left in the model."""
    alive = cg.live_spaces(cg.dead_nodes(drop))
    for gid in unit_keep:
        for s in cg.groups[gid].spaces:
            space = cg.spaces[s]
            if s in alive and not cg.keep_indices(s, unit_keep).size:
                raise ValueError(
                    f"the gates of group {gid} remove every channel of '{space.node}' (dim {space.dim}); "
                    "a channel dimension cannot become empty: keep at least one of its units")


def plan_slices(cg: ChannelGraph, unit_keep: dict[int, np.ndarray]) -> dict[str, list[tuple[int, np.ndarray]]]:
    """``{canonical tensor name: [(dim, kept indices), ...]}`` for every tensor whose size
    changes when the groups keep ``unit_keep``."""
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for b in cg.bindings:
        if cg.spaces[b.space].group not in unit_keep:
            continue
        idx = cg.keep_indices(b.space, unit_keep)
        if b.period is not None:
            idx = idx[idx < b.period]
        if len(idx) != cg.params[b.param].shape[b.dim]:
            out.setdefault(b.param, []).append((b.dim, idx))
    return out


def _rewrite(node: fx.Node, rw: Rewrite, cg: ChannelGraph, keep: dict[int, np.ndarray],
             modules: dict[str, nn.Module]) -> None:
    if rw.kind == "sizes":
        sizes = sizes_of(node, modules)
        values = list(sizes.values)
        values[rw.pos] = len(cg.keep_indices(rw.spaces[0], keep))
        set_sizes(node, modules, values)
    elif rw.kind == "slice":
        idx = node.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        bounds = items[rw.pos]
        assert isinstance(bounds, slice), f"slice rewrite of '{node.name}' at a {type(bounds).__name__}"
        start, stop, _ = bounds.indices(cg.spaces[rw.spaces[0]].size)
        kept = cg.keep_indices(rw.spaces[0], keep)
        items[rw.pos] = slice(int(np.searchsorted(kept, start)), int(np.searchsorted(kept, stop)))
        node.args = (node.args[0], tuple(items) if isinstance(idx, tuple) else items[0])
    elif rw.kind == "split":
        x = node.args[0] if node.args else node.kwargs["input"]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (x, [len(cg.keep_indices(s, keep)) for s in rw.spaces]), {"dim": rw.pos}
    elif rw.kind == "norm":
        size = (len(cg.keep_indices(rw.spaces[0], keep)),)
        if node.op == "call_module" and isinstance(modules.get(node.target), TRAILING_NORM):
            modules[node.target].normalized_shape = size
        elif node.op == "call_function" and node.target in TRAILING_NORM_FUNCTIONS:
            if len(node.args) > rw.pos:
                node.args = (*node.args[:rw.pos], size, *node.args[rw.pos + 1:])
            else:
                node.kwargs = {**node.kwargs, "normalized_shape": size}
        # else: the gated model's norm with masked statistics, which normalises what it is given
    elif rw.kind == "scale":  # attention's default scale, 1/sqrt(head_dim), stays the dense model's
        node.kwargs = {**node.kwargs, "scale": float(rw.pos) ** -0.5}
    else:  # pragma: no cover - the analysis records no other kind
        raise ValueError(f"unknown rewrite kind {rw.kind!r}")


def rewrite_graph(graph: fx.Graph, modules: dict[str, nn.Module], cg: ChannelGraph, unit_keep: dict[int, np.ndarray],
                  drop: set[int]) -> tuple[dict[str, str], list[nn.Module]]:
    """Rewrite ``graph`` (in place) for the compacted model: shape constants follow the
    kept sizes, each dropped branch's add is replaced by its stream, and what no longer
    feeds the output is removed. Returns ``{erased add: node that took its place}`` and
    the modules whose ``inplace`` flag was cleared."""
    nodes = {n.name: n for n in graph.nodes}
    dead = cg.dead_nodes(drop)
    for rw in cg.rewrites:
        if rw.node in nodes and rw.node not in dead:
            _rewrite(nodes[rw.node], rw, cg, unit_keep, modules)
    replaced: dict[str, str] = {}
    touched: list[nn.Module] = []
    for i in sorted(drop):  # branches are numbered in graph order
        br = cg.branches[i]
        stream = nodes[replaced.get(br.stream, br.stream)]
        add = nodes[br.add]
        users = list(add.users)  # in graph order
        add.replace_all_uses_with(stream)
        graph.erase_node(add)
        replaced[br.add] = stream.name
        current = stream  # what the add's later users read: after an in-place write made out of place, its result
        for user in users:
            if current is not stream:
                user.replace_input_with(stream, current)
                continue
            writes = writes_first_input(modules, user, stream)
            m = out_of_place(modules, user, stream)
            if m is not None:
                touched.append(m)
            if writes:  # `z += y; z.add_(1); return z`: z (now the stream) is read from the write's result on
                current = user
    graph.eliminate_dead_code(is_impure_node=is_impure(modules))
    graph.lint()
    return replaced, touched


class Compact(PassBase):
    """Slice ``gm`` to the units ``unit_keep[group]`` and drop the branches ``drop``, in
    place, putting *new* sliced tensors in the modules (the tensors ``gm`` held before
    are left untouched, so ``gm`` may share them with another model). With ``check =
    (example inputs, expected output)``, the result is run on the example and compared."""

    def __init__(self, cg: ChannelGraph, unit_keep: dict[int, np.ndarray], drop: set[int],
                 check: tuple[tuple, torch.Tensor] | None = None, rtol: float = EQUIVALENCE_RTOL) -> None:
        super().__init__()
        self.cg, self.unit_keep, self.drop, self.check, self.rtol = cg, cg.complete_keep(unit_keep), set(drop), check, rtol
        #: ``{canonical tensor name: [(dim, kept indices)]}`` of every tensor sliced
        self.sliced: dict[str, list[tuple[int, np.ndarray]]] = {}

    def requires(self, gm: fx.GraphModule) -> None:
        check_nonempty(self.cg, self.unit_keep, self.drop)

    def call(self, gm: fx.GraphModule) -> PassResult:
        cg = self.cg
        self.sliced = plan_slices(cg, self.unit_keep)
        tensors = dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])
        owners = set()
        for canon, slices in self.sliced.items():
            names = [n for n in cg.params[canon].names if n in tensors]
            if not names:
                continue
            new = index_tensor(tensors[names[0]], slices)
            if isinstance(tensors[names[0]], nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensors[names[0]].requires_grad)
            for name in names:
                replace_tensor(gm, name, new)
                owners.add(name.rpartition(".")[0])
        modules = dict(gm.named_modules())
        for name in owners:
            refresh_module(modules[name], name in cg.depthwise)
        rewrite_graph(gm.graph, modules, cg, self.unit_keep, self.drop)
        delete_unreferenced(gm)
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        if self.check is None:
            return
        example, expected = self.check
        was = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                out = gm(*example)
        finally:
            gm.train(was)
        err = max_relative_error(out, expected)
        if not err <= self.rtol:
            raise CompactionError(
                f"the compacted model's output differs from the gated model's on the example input (max relative "
                f"error {err:.2e} > {self.rtol:g}); this is a bug in fxprune's analysis of this model: please report it")


def max_relative_error(out, expected) -> float:
    """Largest ``max|a - b| / max|b|`` over the tensors of two outputs (same structure)."""
    from torch.utils._pytree import tree_leaves

    a, b = tree_leaves(out), tree_leaves(expected)
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if isinstance(y, torch.Tensor):
            if not isinstance(x, torch.Tensor) or x.shape != y.shape:
                return float("inf")
            if y.numel():
                scale = y.detach().abs().max().clamp_min(1e-12)
                worst = max(worst, ((x.detach().float() - y.detach().float()).abs().max() / scale).item())
    return worst
