"""Gate insertion pass: one mask source, gated reads of channel groups, gated branches.

The pass knows where gates go, not what a gate computes: the caller hands it the module
that computes every mask once per forward (``bank``, called with the input that carries
the batch dimension) and constructors for the module that applies a group's mask where a
consumer reads it (``read``), the one that scales a residual branch (``layer``) and the
norm with masked statistics that takes the place of a LayerNorm / RMSNorm over a gated
group (``norm``), as FX quantization's ``prepare`` is handed observer constructors. Every
node it inserts or changes is tagged in ``node.meta[GATE_META]``; reads of the same tensor
share one gated value.

Example::

    >>> from fxprune.passes import analyze, trace
    >>> gm = trace(model, (x,))
    >>> cg = analyze(gm)
    >>> ones = lambda *_: nn.Identity()         # what fxprune.prepare hands it: GateBank, GateRead, ...
    >>> InsertGates(cg, [g.id for g in cg.prunable_groups], list(cg.branches), nn.Identity(), ones, ones)(gm).modified
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .channel_graph import Branch, ChannelGraph, Read
from .norms import NormCall, norm_call, original, restore_norm

__all__ = ["InsertGates", "StripGates", "strip_gate_nodes", "GATE_META", "NORM_META", "BANK", "READS", "LAYERS", "gate_nodes"]

#: ``node.meta`` key tagging the nodes gate insertion adds or changes: ``"bank"``, ``"read"``,
#: ``"layer"``, ``"norm"`` (a norm call made a norm with masked statistics) or
#: ``"norm_tensor"`` (its module's weight or bias, read for it)
GATE_META = "fxprune_gate"
#: ``node.meta`` key of a ``"norm"`` node: the plain norm call it was
NORM_META = "fxprune_norm"
#: where the gate modules live in the gated model
BANK, READS, LAYERS = "fxprune_gates", "fxprune_reads", "fxprune_layers"


def gate_nodes(graph: fx.Graph, role: str | None = None) -> list[fx.Node]:
    """The nodes gate insertion added (of one ``role``, or all)."""
    return [n for n in graph.nodes if GATE_META in n.meta and (role is None or n.meta[GATE_META] == role)]


class InsertGates(PassBase):
    """Gate the reads of ``groups`` (and of the product groups of their units) and the
    outputs of ``branches`` of ``gm``, in place."""

    def __init__(self, cg: ChannelGraph, groups: Sequence[int], branches: Sequence[int], bank: nn.Module,
                 read: Callable[[Read], nn.Module], layer: Callable[[Branch], nn.Module],
                 norm: Callable[[Read, NormCall], nn.Module] | None = None) -> None:
        super().__init__()
        self.cg, self.groups, self.branches = cg, set(groups), list(branches)
        self.bank, self.make_read, self.make_layer, self.make_norm = bank, read, layer, norm

    def requires(self, graph_module: fx.GraphModule) -> None:
        if gate_nodes(graph_module.graph):
            raise ValueError("the model already has fxprune gates")
        bad = self.groups - {g.id for g in self.cg.prunable_groups}
        if bad:
            raise ValueError(f"groups {sorted(bad)} are frozen or unknown: they cannot be gated")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph, cg = gm.graph, self.cg
        nodes = {n.name: n for n in graph.nodes}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        ref = next((p for p in placeholders if p.name == cg.batch_input), None) or next(
            (p for p in placeholders if "tensor_meta" in p.meta), None)
        if ref is None:
            raise ValueError("gates need a tensor input to take the batch size from")
        gm.add_submodule(BANK, self.bank)
        gm.add_submodule(READS, nn.ModuleDict())
        gm.add_submodule(LAYERS, nn.ModuleDict())
        with graph.inserting_after(placeholders[-1]):
            mask = graph.call_module(BANK, (ref,))
        mask.meta[GATE_META] = "bank"

        order = {n.name: i for i, n in enumerate(graph.nodes)}
        modules = dict(gm.named_modules())
        gated: dict[tuple[str, int], fx.Node] = {}
        reads = gm.get_submodule(READS)
        gated_groups = self.groups | {  # a product group is read through its factors' gates
            g.id for g in cg.groups.values() if g.derived and g.prunable and set().union(*g.factor_ids()) <= self.groups}
        for r in sorted(cg.reads, key=lambda r: order[r.node]):
            if cg.spaces[r.space].group not in gated_groups:
                continue
            consumer = nodes[r.node]
            if r.kind == "norm":
                self._mask_norm(gm, modules, consumer, r, mask, reads)
                continue
            src = consumer.args[r.arg]
            key = (src.name, r.space)
            if key not in gated:
                name = f"r{len(reads)}"
                reads[name] = self.make_read(r)
                with graph.inserting_before(consumer):
                    gated[key] = graph.call_module(f"{READS}.{name}", (src, mask))
                gated[key].meta[GATE_META] = "read"
            consumer.update_arg(r.arg, gated[key])

        layers = gm.get_submodule(LAYERS)
        for i in self.branches:
            br = cg.branches[i]
            add, out = nodes[br.add], nodes[br.out]
            layers[f"b{i}"] = self.make_layer(br)
            with graph.inserting_before(add):
                g = graph.call_module(f"{LAYERS}.b{i}", (out, mask))
            g.meta[GATE_META] = "layer"
            add.replace_input_with(out, g)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _mask_norm(self, gm: fx.GraphModule, modules: dict[str, nn.Module], node: fx.Node, r: Read, mask: fx.Node,
                   reads: nn.ModuleDict) -> None:
        """Turn the norm call ``node`` into the gate module ``make_norm`` builds, called as
        ``(x, mask, weight, bias, normalized_shape)`` (the last one is only kept for the
        plain call, None for a module); the node keeps its name, and what it was is kept
        in ``node.meta[NORM_META]`` for :func:`strip_gate_nodes`."""
        if self.make_norm is None:
            raise ValueError(f"'{node.name}' normalises a gated channel group: InsertGates needs a norm constructor")
        nc = norm_call(node, modules)
        spec = original(node, nc)
        name = f"n{len(reads)}"
        reads[name] = self.make_norm(r, nc)
        tensors = []
        for t in (nc.weight, nc.bias):
            if isinstance(t, str):  # the module's own tensor: read it where the module was called
                with gm.graph.inserting_before(node):
                    t = gm.graph.get_attr(t)
                t.meta[GATE_META] = "norm_tensor"
            tensors.append(t)
        node.op, node.target = "call_module", f"{READS}.{name}"
        node.args, node.kwargs = (nc.x, mask, *tensors, nc.normalized_shape), {}
        node.meta[GATE_META], node.meta[NORM_META] = "norm", spec


def strip_gate_nodes(graph: fx.Graph) -> None:
    """Remove every node gate insertion added from ``graph`` (reads and layer gates
    are replaced by their input, norms with masked statistics become the plain norm
    call they were): the graph computes as if all gates were 1."""
    for n in reversed(gate_nodes(graph)):
        kind = n.meta[GATE_META]
        if kind == "norm":
            x, _, weight, bias, normalized_shape = n.args
            restore_norm(n, n.meta.pop(NORM_META), x, weight, bias, normalized_shape)
            del n.meta[GATE_META]
            continue
        if kind not in ("bank", "norm_tensor"):
            n.replace_all_uses_with(n.args[0])
        graph.erase_node(n)


class StripGates(PassBase):
    """Remove every node gate insertion added, and the gate modules (in place)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        strip_gate_nodes(gm.graph)
        for name in (BANK, READS, LAYERS):
            if hasattr(gm, name):
                delattr(gm, name)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)
