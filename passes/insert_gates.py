"""Gate insertion pass: one mask source, gated reads of channel groups, gated branches.

The pass knows where gates go, not what a gate computes: the caller hands it the module
that computes every mask once per forward (``bank``, called with the input that carries
the batch dimension) and constructors for the module that applies a group's mask where a
consumer reads it (``read``) and the one that scales a residual branch (``layer``), as FX
quantization's ``prepare`` is handed observer constructors. Every node it inserts is
tagged in ``node.meta[GATE_META]`` (``"bank"``, ``"read"`` or ``"layer"``); reads of the
same tensor share one gated value.

Example::

    >>> cg = analyze(gm)
    >>> InsertGates(cg, [g.id for g in cg.prunable_groups], list(cg.branches), bank, make_read, make_layer)(gm)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .channel_graph import Branch, ChannelGraph, Read

__all__ = ["InsertGates", "StripGates", "strip_gate_nodes", "GATE_META", "BANK", "READS", "LAYERS", "gate_nodes"]

#: ``node.meta`` key tagging the nodes gate insertion adds: ``"bank"``, ``"read"`` or ``"layer"``
GATE_META = "fxprune_gate"
#: where the gate modules live in the gated model
BANK, READS, LAYERS = "fxprune_gates", "fxprune_reads", "fxprune_layers"


def gate_nodes(graph: fx.Graph, role: str | None = None) -> list[fx.Node]:
    """The nodes gate insertion added (of one ``role``, or all)."""
    return [n for n in graph.nodes if GATE_META in n.meta and (role is None or n.meta[GATE_META] == role)]


class InsertGates(PassBase):
    """Gate the reads of ``groups`` and the outputs of ``branches`` of ``gm``, in place."""

    def __init__(self, cg: ChannelGraph, groups: Sequence[int], branches: Sequence[int], bank: nn.Module,
                 read: Callable[[Read], nn.Module], layer: Callable[[Branch], nn.Module]) -> None:
        super().__init__()
        self.cg, self.groups, self.branches = cg, set(groups), list(branches)
        self.bank, self.make_read, self.make_layer = bank, read, layer

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
        gated: dict[tuple[str, int], fx.Node] = {}
        reads = gm.get_submodule(READS)
        for r in sorted(cg.reads, key=lambda r: order[r.node]):
            if cg.spaces[r.space].group not in self.groups:
                continue
            consumer = nodes[r.node]
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


def strip_gate_nodes(graph: fx.Graph) -> None:
    """Remove every node gate insertion added from ``graph`` (reads and layer gates
    are replaced by their input): the graph computes as if all gates were 1."""
    for n in reversed(gate_nodes(graph)):
        if n.meta[GATE_META] != "bank":
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
