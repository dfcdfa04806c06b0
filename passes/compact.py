"""Compaction rewrite: remove gates, slice what they switched off, delete dropped branches.

Two passes over a *copy* of the gated model:

* :class:`StripGates` removes every gate node and module, leaving the original graph;
* :class:`Compact` slices every parameter and buffer bound to a group with the kept
  indices, updates module attributes (``in_channels``, ``groups``, ``num_features``, ...),
  rewrites shape constants (view sizes, slice bounds, split sizes; ``chunk`` becomes
  ``split``), and replaces each dropped branch's add by its stream.

The result is a plain ``GraphModule``: no hooks, no masks, no fxprune modules, so
``torch.compile`` and ``torch.export`` see an ordinary network.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..gates import apply_layer_gate
from .channel_graph import ChannelGraph
from .insert_gates import LAYERS, READS, UNITS

__all__ = ["StripGates", "Compact", "slice_tensor", "refresh_module", "reached_tensors"]


class StripGates(PassBase):
    """Remove gate nodes and gate modules (in place); the model computes as if all gates were 1."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        for n in list(graph.nodes):
            if (n.op == "call_module" and str(n.target).startswith(READS + ".")) or (
                n.op == "call_function" and n.target is apply_layer_gate
            ):
                n.replace_all_uses_with(n.args[0])
                graph.erase_node(n)
        for n in list(graph.nodes):
            if n.op == "call_module" and str(n.target).startswith((UNITS + ".", LAYERS + ".")):
                graph.erase_node(n)
        for name in (UNITS, LAYERS, READS):
            if hasattr(gm, name):
                delattr(gm, name)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)


def slice_tensor(t: torch.Tensor, dim: int, idx: np.ndarray) -> None:
    """Keep ``idx`` along ``dim`` of ``t`` in place (``t`` stays the same object, so an
    optimizer holding it keeps working)."""
    new = t.data.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device)).contiguous()
    if t.requires_grad:
        # Autograd caches a parameter's gradient accumulator with its old shape, and a
        # graph still alive (the last step's loss) keeps that cache; assigning data of
        # another dtype first is the supported way to make autograd drop it.
        t.data = torch.empty(0, dtype=torch.float64 if t.dtype != torch.float64 else torch.float32, device=t.device)
    t.data = new


def refresh_module(m: nn.Module) -> None:
    """Re-derive a layer's size attributes from its (sliced) parameters."""
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight
        if m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        else:
            if m.groups > 1 and m.groups == m.in_channels:  # depthwise: one group per input channel
                mult = m.out_channels // m.groups
                m.groups = w.shape[0] // mult
                m.in_channels = m.groups
            else:
                m.in_channels = w.shape[1] * m.groups
            m.out_channels = w.shape[0]
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, (nn.modules.batchnorm._NormBase)):
        t = m.weight if m.weight is not None else m.running_mean
        if t is not None:
            m.num_features = t.shape[0]


_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def _out_of_place(gm: fx.GraphModule, node: fx.Node, stream: fx.Node) -> None:
    """``node`` now reads ``stream`` where it read a fresh add result: an in-place op there
    would overwrite a tensor others (and autograd) still hold, so make it out-of-place."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if getattr(m, "inplace", False):
            m.inplace = False
    elif node.op == "call_function":
        if node.target in _INPLACE_OPERATORS and node.args and node.args[0] is stream:
            node.target = _INPLACE_OPERATORS[node.target]
        elif node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method" and node.target.endswith("_") and hasattr(torch.Tensor, node.target[:-1]):
        node.target = node.target[:-1]


def reached_tensors(gm: fx.GraphModule, nodes: list[fx.Node] | None = None) -> set[str]:
    """Names of the parameters and buffers that the ``call_module`` and ``get_attr`` nodes
    among ``nodes`` (default: the whole graph) reach."""
    nodes = list(gm.graph.nodes) if nodes is None else nodes
    called = {n.target for n in nodes if n.op == "call_module"}
    fetched = {n.target for n in nodes if n.op == "get_attr"}
    return {
        name for name, _ in [*gm.named_parameters(), *gm.named_buffers()]
        if name in fetched or any((owner := name.rpartition(".")[0]) == c or owner.startswith(c + ".") for c in called)
    }


def _delete_unreferenced_tensors(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers that no ``call_module`` or ``get_attr`` node reaches."""
    reached = reached_tensors(gm)
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in reached:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


class Compact(PassBase):
    """Slice ``gm`` (in place) to the units ``unit_keep[group]`` and drop ``drop`` branches."""

    def __init__(self, cg: ChannelGraph, unit_keep: dict[int, np.ndarray], drop: set[int]) -> None:
        super().__init__()
        self.cg, self.unit_keep, self.drop = cg, unit_keep, drop
        #: ``(tensor name, dim, kept indices, shape before)`` of every tensor sliced.
        self.sliced: list[tuple[str, int, np.ndarray, torch.Size]] = []
        self.dead = set().union(*(cg.branches[i].nodes for i in drop)) if drop else set()

    def requires(self, gm: fx.GraphModule) -> None:
        for gid, keep in self.unit_keep.items():
            for s in self.cg.groups[gid].spaces:
                space = self.cg.spaces[s]
                if space.node not in self.dead and not self.cg.keep_indices(s, self.unit_keep).size:
                    raise ValueError(
                        f"the gates of group {gid} remove every channel of '{space.node}' (dim {space.dim}); "
                        "a channel dimension cannot become empty: keep at least one of its units"
                    )

    def _keep(self, space: int) -> np.ndarray:
        return self.cg.keep_indices(space, self.unit_keep)

    def call(self, gm: fx.GraphModule) -> PassResult:
        cg = self.cg
        tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
        owners = set()
        for b in cg.bindings:
            if cg.spaces[b.space].group not in self.unit_keep or b.target not in tensors:
                continue
            idx = self._keep(b.space)
            if b.period is not None:
                idx = idx[idx < b.period]
            if len(idx) != tensors[b.target].shape[b.dim]:
                self.sliced.append((b.target, b.dim, idx, tensors[b.target].shape))
                slice_tensor(tensors[b.target], b.dim, idx)
                owners.add(b.target.rpartition(".")[0])
        for name in owners:
            refresh_module(gm.get_submodule(name))

        nodes = {n.name: n for n in gm.graph.nodes}
        for rw in cg.rewrites:
            if rw.node in nodes and rw.node not in self.dead:
                getattr(self, f"_rewrite_{rw.kind}")(nodes[rw.node], rw)

        replaced: dict[str, fx.Node] = {}
        for i in sorted(self.drop):  # branches are numbered in graph order
            br = cg.branches[i]
            stream = replaced.get(br.stream, nodes[br.stream])
            users = list(nodes[br.add].users)
            nodes[br.add].replace_all_uses_with(stream)
            gm.graph.erase_node(nodes[br.add])
            replaced[br.add] = stream
            for user in users:
                _out_of_place(gm, user, stream)
        gm.graph.eliminate_dead_code()
        _delete_unreferenced_tensors(gm)
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    # -- shape constants
    def _rewrite_view(self, node: fx.Node, rw) -> None:
        new = len(self._keep(rw.spaces[0]))
        sizes_in_tuple = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
        sizes = list(node.args[1] if sizes_in_tuple else node.args[1:])
        if isinstance(sizes[rw.pos], int) and sizes[rw.pos] != -1:
            sizes[rw.pos] = new
        node.args = (node.args[0], type(node.args[1])(sizes)) if sizes_in_tuple else (node.args[0], *sizes)

    def _rewrite_slice(self, node: fx.Node, rw) -> None:
        idx = node.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        sl, size = items[rw.pos], self.cg.spaces[rw.spaces[0]].size
        start, stop, _ = sl.indices(size)
        kept = self._keep(rw.spaces[0])
        a = int(np.searchsorted(kept, start))
        items[rw.pos] = slice(a, int(np.searchsorted(kept, stop)))
        node.args = (node.args[0], tuple(items) if isinstance(idx, tuple) else items[0])

    def _rewrite_split(self, node: fx.Node, rw) -> None:
        sizes = [len(self._keep(s)) for s in rw.spaces]
        x = node.args[0] if node.args else node.kwargs["input"]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (x, sizes), {"dim": rw.pos}
