"""Dependency analysis pass: a traced ``GraphModule`` -> :class:`ChannelGraph`.

One walk over the fx graph in topological order applies each op's rule
(:mod:`.dispatch`), building a networkx multigraph of channel spaces whose edges tie
channel indices. Groups are its connected components; units (what one gate entry
removes) are the classes of tied indices inside a group; residual branches are the
``add(x, F(x))`` whose F feeds nothing else. The batch dimension is followed from the
inputs by the same rules (as a frozen space), so every read knows its batch dim.

Example::

    >>> from fxprune.passes import trace
    >>> gm = trace(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),))
    >>> cg = analyze(gm)
    >>> len(cg.prunable_groups), len(cg.branches)
    (12, 8)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import fx

from ..channel_graph import Branch, ChannelGraph, OpFlops, Param
from ..op_classes import CONV, CONV_FUNCTIONS, CONV_TRANSPOSE, LINEAR, LINEAR_FUNCTIONS, mutates
from .branches import find_branches
from .builder import Builder
from .dispatch import rule_for, unread_functions
from .generic import shape, tensor_args
from .groups import resolve_products

__all__ = ["analyze", "Builder", "batch_dims_of", "unread_functions"]


def batch_dims_of(gm: fx.GraphModule, batch_dim: int | Sequence[int | None] | None = 0) -> dict[str, int | None]:
    """The batch dim of every placeholder: ``batch_dim`` per tensor input (a sequence), or
    the same dim for every tensor input whose size there equals the first one's (an int)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if batch_dim is None or isinstance(batch_dim, int):
        out, size = {}, None
        for p in placeholders:
            s = shape(p)
            d = None if batch_dim is None or s is None or not -len(s) <= batch_dim < len(s) else batch_dim % len(s)
            if d is not None and size is not None and s[d] != size:
                d = None
            if d is not None and size is None:
                size = s[d]
            out[p.name] = d
        return out
    dims = list(batch_dim)
    if len(dims) != len(placeholders):
        raise ValueError(f"batch_dim gives {len(dims)} dims for {len(placeholders)} inputs "
                         f"({', '.join(p.name for p in placeholders)}); give one per input (None: no batch dim)")
    out = {}
    for p, d in zip(placeholders, dims):
        s = shape(p)
        if d is not None and (s is None or not -len(s) <= d < len(s)):
            raise ValueError(f"batch_dim {d} is not a dimension of input '{p.name}' (shape {s})")
        out[p.name] = None if d is None else d % len(s)
    return out


def _reached(gm: fx.GraphModule, b: Builder) -> dict[str, set[str]]:
    """Canonical tensor name -> the nodes that reach it (call_module of its owner or an
    enclosing module, get_attr of it or of an enclosing module)."""
    own: dict[str, list[str]] = {}  # module path -> canonical names of its own tensors
    for name, canon in b.canonical.items():
        own.setdefault(name.rpartition(".")[0], []).append(canon)
    reach: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in b.canonical:
            reach.setdefault(b.canonical[node.target], set()).add(node.name)
        elif node.op in ("call_module", "get_attr") and node.target in b.modules:
            m = b.modules[node.target]
            paths = [node.target] if not m._modules else [  # a module with children (a leaf kept whole)
                f"{node.target}.{p}" if p else node.target for p, _ in m.named_modules(remove_duplicate=False)]
            for path in paths:
                for canon in own.get(path, ()):
                    reach.setdefault(canon, set()).add(node.name)
    return reach


def _all_channels(gm: fx.GraphModule, b: Builder) -> int:
    """Output channels of every convolution and linear layer: modules (each once, leaves'
    children included) and functional calls."""
    total = 0
    functional = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_FUNCTIONS | LINEAR_FUNCTIONS]
    # a module whose weight a functional call reads (nn.MultiheadAttention's out_proj, written out) counts there
    read = {id(b.tensors[w.target]) for n in functional for w in n.args[1:2]
            if isinstance(w, fx.Node) and w.op == "get_attr" and w.target in b.tensors}
    for m in {id(m): m for m in b.modules.values()}.values():
        if isinstance(m, CONV + CONV_TRANSPOSE + LINEAR) and id(m.weight) in read:
            continue
        if isinstance(m, CONV + CONV_TRANSPOSE):
            total += m.out_channels
        elif isinstance(m, LINEAR):
            total += m.out_features
    for n in functional:
        if shape(n):
            total += shape(n)[1 if n.target in CONV_FUNCTIONS else -1]
    return total


def _live_nodes(gm: fx.GraphModule) -> set[str]:
    """Nodes the output depends on (what dead-code elimination keeps), writes into
    tensors included."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    live, pending = set(), [out, *(n for n in gm.graph.nodes if mutates(n))]
    while pending:
        n = pending.pop()
        if n.name in live:
            continue
        live.add(n.name)
        pending.extend(n.all_input_nodes)
    return live


def analyze(gm: fx.GraphModule, batch_dim: int | Sequence[int | None] | None = 0) -> ChannelGraph:
    """Find the channel groups, their roles, the parameters and the residual branches of
    a traced model. ``gm`` must come from :func:`fxprune.trace` (shapes in
    ``node.meta``); ``batch_dim`` is the dim of the inputs that indexes examples (one
    per input, or one for all; None: no batch dim).
    """
    nodes = list(gm.graph.nodes)
    if not any("tensor_meta" in n.meta for n in nodes):
        raise ValueError("analyze needs shapes in node.meta: trace the model with fxprune.trace(model, example_inputs)")
    inputs = batch_dims_of(gm, batch_dim)
    b = Builder(gm, inputs)
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            for t in tensor_args(node):
                for s in b.dims_of(t).values():
                    b.freeze(s, f"model output '{t.name}'")
            continue
        b.dims[node.name] = rule_for(b, node)(b, node)
    producers = {bd.space for bd in b.bindings.values() if bd.role == "producer"}
    groups, fixes = resolve_products(b.graph, b.spaces, producers, b.ties, b.factorizations, b.freeze)
    b.rewrites += [rw for rw in dict.fromkeys(fixes) if rw not in b.rewrites]
    for r in b.reads:
        if r.batch_dim is None:
            groups[b.spaces[r.space].group].per_example = False

    reach, live = _reached(gm, b), _live_nodes(gm)
    found = find_branches(gm)
    branch_nodes = [frozenset(n.name for n in cone) for _, _, _, cone in found]
    in_branches: dict[str, set[int]] = {}
    for i, names in enumerate(branch_nodes):
        for n in names:
            in_branches.setdefault(n, set()).add(i)
    tensors: dict[str, list[str]] = {}
    for name, canon in b.canonical.items():
        tensors.setdefault(canon, []).append(name)
    params = {}
    contents: dict[int, list[str]] = {i: [] for i in range(len(found))}
    for canon, names in tensors.items():
        users = reach.get(canon, set()) & live
        inside = set.intersection(*(in_branches.get(u, set()) for u in users)) if users else set()
        for i in inside:
            contents[i].append(canon)
        t = b.tensors[canon]
        params[canon] = Param(canon, tuple(names), tuple(t.shape), canon in b.buffers, b.flops.get(canon, 0.0),
                              tuple(sorted(inside)), bool(users))
    op_flops = []
    for name, flops, spaces in b.op_flops:
        if name in live:
            per_entry = flops / math.prod(b.spaces[s].size for s in spaces)
            op_flops.append(OpFlops(name, per_entry, spaces, tuple(sorted(in_branches.get(name, ())))))
    branches = {
        i: Branch(i, add.name, stream.name, out.name, branch_nodes[i], tuple(contents[i]), b.batch_dim(out))
        for i, (add, stream, out, _) in enumerate(found)
    }
    return ChannelGraph(
        graph=b.graph, spaces={s.id: s for s in b.spaces}, groups=groups, branches=branches, params=params,
        bindings=list(b.bindings.values()), reads=b.reads, rewrites=b.rewrites, node_dims=b.dims,
        batch_size=b.batch_size, inputs=inputs, all_channels=_all_channels(gm, b), layer_outputs=b.layer_outputs, depthwise=b.depthwise, leaves=dict(b.leaves),
        op_flops=op_flops,
    )
