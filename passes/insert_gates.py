"""Gate insertion pass: put unit gates where consumers read a group, layer gates on branches.

For every prunable group one :class:`~fxprune.gates.BernoulliGate` computes the group's
mask once per forward (``fxprune_units.g<id>``); every consumer read of the group goes
through a :class:`~fxprune.gates.ChannelGateRead` that expands the mask to the read
space's channels. Every residual branch output is scaled by its layer gate
(``fxprune_layers.b<id>``) before the add. Reads of the same tensor share one gated value.

Example::

    >>> gm = trace(model, (x,)); cg = analyze(gm)
    >>> gated = InsertGates(cg)(gm).graph_module
"""

from __future__ import annotations

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..gates import BernoulliGate, ChannelGateRead, apply_layer_gate
from .channel_graph import ChannelGraph

__all__ = ["InsertGates", "gate_modules", "UNITS", "LAYERS", "READS", "CHANNEL_GRAPH"]

UNITS, LAYERS, READS = "fxprune_units", "fxprune_layers", "fxprune_reads"
#: ``gm.meta`` key of the ChannelGraph a gated model was built from.
CHANNEL_GRAPH = "fxprune_channel_graph"


def gate_modules(gm: fx.GraphModule, kind: str) -> dict[str, nn.Module]:
    """The gate modules of one kind (``UNITS``, ``LAYERS`` or ``READS``) by key; empty if
    there are none (compaction deletes a gate dict no node uses any more)."""
    return dict(gm.get_submodule(kind).items()) if hasattr(gm, kind) else {}


class InsertGates(PassBase):
    """Insert unit gates (``units=True``) and layer gates (``layers=True``) into ``gm``, in place."""

    def __init__(self, cg: ChannelGraph, units: bool = True, layers: bool = True, theta_init: float = 1.0,
                 estimator: str = "straight_through") -> None:
        super().__init__()
        self.cg, self.units, self.layers, self.theta_init, self.estimator = cg, units, layers, theta_init, estimator

    def requires(self, graph_module: fx.GraphModule) -> None:
        if any(n.op == "call_module" and str(n.target).startswith((UNITS, LAYERS)) for n in graph_module.graph.nodes):
            raise ValueError("the model already has fxprune gates")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph, cg = gm.graph, self.cg
        nodes = {n.name: n for n in graph.nodes}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        ref = next((p for p in placeholders if "tensor_meta" in p.meta and hasattr(p.meta["tensor_meta"], "shape")), None)
        if ref is None:
            raise ValueError("gates need a tensor input to take the batch size from")
        groups = cg.prunable_groups if self.units else []
        branches = cg.branches if self.layers else []
        gm.add_submodule(UNITS, nn.ModuleDict({f"g{g.id}": BernoulliGate(g.num_units, self.theta_init, g.segments(), self.estimator)
                                                 for g in groups}))
        gm.add_submodule(LAYERS, nn.ModuleDict({f"b{b.id}": BernoulliGate(1, self.theta_init, [], self.estimator) for b in branches}))
        gm.add_submodule(READS, nn.ModuleDict())

        masks: dict[str, fx.Node] = {}
        with graph.inserting_after(placeholders[-1]):
            for key in [f"{LAYERS}.b{b.id}" for b in reversed(branches)] + [f"{UNITS}.g{g.id}" for g in reversed(groups)]:
                masks[key] = graph.call_module(key, (ref,))

        prunable = {g.id for g in groups}
        order = {n.name: i for i, n in enumerate(graph.nodes)}
        gated: dict[tuple[str, int], fx.Node] = {}
        for r in sorted(cg.reads, key=lambda r: order[r.node]):
            gid = cg.spaces[r.space].group
            if gid not in prunable:
                continue
            consumer = nodes[r.node]
            src = consumer.args[r.arg]
            key = (src.name, r.space)
            if key not in gated:
                name = f"r{len(gm.get_submodule(READS))}"
                gm.get_submodule(READS)[name] = ChannelGateRead(
                    cg.groups[gid].unit_index[r.space], r.dim, cg.groups[gid].num_units, gid, r.space)
                with graph.inserting_before(consumer):
                    gated[key] = graph.call_module(f"{READS}.{name}", (src, masks[f"{UNITS}.g{gid}"]))
            consumer.update_arg(r.arg, gated[key])

        for b in branches:
            add, out = nodes[b.add], nodes[b.out]
            with graph.inserting_before(add):
                g = graph.call_function(apply_layer_gate, (out, masks[f"{LAYERS}.b{b.id}"]))
            add.replace_input_with(out, g)

        graph.lint()
        gm.recompile()
        gm.meta[CHANNEL_GRAPH] = cg
        return PassResult(gm, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        n_units = len(graph_module.get_submodule(UNITS))
        if self.units and n_units != len(self.cg.prunable_groups):
            raise AssertionError("gate insertion lost a group")
