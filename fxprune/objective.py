"""The regulariser of method.md section 2: GSM weight prior and the complexity cost.

``penalty() = 1/2 lam1 ||W||^2
            + 1/2 (lam0 - lam1) [ sum_units (1 - theta_u) ||W_u||^2 + sum_layers (1 - theta_l) ||W_l||^2 ]
            + gamma * C(theta)``

For a structure that no other contains this is exactly method.md's
``1/2 (lam1 theta + lam0 (1 - theta)) ||W_g||^2``; writing the slab once for every weight
keeps a weight inside both a unit and a gated branch from getting the slab twice. The
plain ``lam1`` term covers ungated weights too: use the optimizer with ``weight_decay=0``.

``C(theta)`` here is the expected fraction of parameters left: each unit's gate multiplies
the parameters in its slices (producers, carriers, consumers), each layer gate the
parameters of its branch (scaled by ``alpha``). The exact FLOPs/parameter polynomial of
method.md section 3 replaces it in the complexity-cost module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, fx

from .api import channel_graph, config_of
from .config import PruneConfig
from .gates import BernoulliGate
from .passes.insert_gates import LAYERS, UNITS, gate_modules

__all__ = ["Objective", "UnitStructure", "LayerStructure", "gated_weights"]


@dataclass
class UnitStructure:
    """One unit gate vector with its weights: ``slices`` are (param, dim, unit of each index)."""

    group: int
    gate: BernoulliGate
    slices: list[tuple[Tensor, int, Tensor]]
    elems: Tensor  # weight entries per unit in ``slices`` (for RMS)
    cost: Tensor  # parameters per unit, consumers included (for C)


@dataclass
class LayerStructure:
    branch: int
    gate: BernoulliGate
    params: list[Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def gated_weights(gated: fx.GraphModule) -> list[tuple[str, Tensor]]:
    """The model's own parameters (gates excluded)."""
    return [(n, p) for n, p in gated.named_parameters() if not n.startswith("fxprune_")]


class Objective:
    """Builds the structures of a gated model and evaluates the penalty; ``rebuild()``
    after live removal."""

    def __init__(self, gated: fx.GraphModule, config: PruneConfig | None = None) -> None:
        self.gated = gated
        self.config = config or config_of(gated)
        self.dense_params = sum(p.numel() for _, p in gated_weights(gated))
        self.rebuild()

    def rebuild(self) -> None:
        gated, cg = self.gated, channel_graph(self.gated)
        #: the model's own parameters; changes only when structures are removed
        self.weights = [p for _, p in gated_weights(gated)]
        params = dict(gated.named_parameters())
        self.units: list[UnitStructure] = []
        for key, gate in gate_modules(gated, UNITS).items():
            g = cg.groups[int(key[1:])]
            slices, cost = [], np.zeros(g.num_units)
            elems = torch.zeros(g.num_units)
            for b in cg.bindings_of(g):
                if b.target not in params:
                    continue
                p = params[b.target]
                idx = g.unit_index[b.space]
                per_channel = p.numel() / len(idx)  # grouped convs: weight rows shared by `groups` channels
                np.add.at(cost, idx, per_channel)
                if b.role in ("producer", "carrier"):
                    t = torch.as_tensor(idx, dtype=torch.long, device=p.device)
                    slices.append((p, b.dim, t))
                    elems.index_add_(0, t.cpu(), torch.full((len(idx),), float(per_channel)))
            self.units.append(UnitStructure(g.id, gate, slices, elems, torch.as_tensor(cost, dtype=torch.float32)))
        self.layers: list[LayerStructure] = []
        nodes = {n.name: n for n in gated.graph.nodes}
        for key, gate in gate_modules(gated, LAYERS).items():
            br = cg.branches[int(key[1:])]
            seen: dict[int, Tensor] = {}
            for name in br.nodes:
                n = nodes.get(name)
                if n is None:
                    continue
                if n.op == "call_module":
                    seen.update({id(p): p for p in gated.get_submodule(n.target).parameters()})
                elif n.op == "get_attr" and n.target in params:
                    seen[id(params[n.target])] = params[n.target]
            self.layers.append(LayerStructure(br.id, gate, list(seen.values())))

    @staticmethod
    def unit_sq(u: UnitStructure) -> Tensor:
        """Squared weight norm of each unit (differentiable)."""
        out = u.gate.theta.new_zeros(u.gate.theta.shape)
        for p, dim, idx in u.slices:
            per = p.pow(2).sum(dim=[d for d in range(p.dim()) if d != dim]) if p.dim() > 1 else p.pow(2)
            out = out.index_add(0, idx, per.to(out.dtype))
        return out

    def cost(self) -> Tensor:
        """``C(theta)``: expected fraction of the dense parameter count left."""
        c = self.config
        total = sum((u.gate.theta * u.cost.to(u.gate.theta)).sum() for u in self.units)
        total = total + sum(c.alpha * l.gate.theta.sum() * l.numel for l in self.layers)
        return total / self.dense_params

    def penalty(self) -> Tensor:
        c = self.config
        device = self.weights[0].device if self.weights else torch.device("cpu")
        slab = 0.5 * c.lam1 * sum((p.pow(2).sum() for p in self.weights), torch.zeros((), device=device))
        spike = torch.zeros((), device=device)
        for u in self.units:
            spike = spike + ((1 - u.gate.theta) * self.unit_sq(u)).sum()
        for l in self.layers:
            spike = spike + (1 - l.gate.theta.sum()) * sum(p.pow(2).sum() for p in l.params)
        return slab + 0.5 * (c.lam0 - c.lam1) * spike + c.gamma * self.cost()
