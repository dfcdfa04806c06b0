"""The regulariser of method.md section 2: GSM weight prior and the complexity cost.

``penalty() = 1/2 lam1 ||W||^2
            + 1/2 (lam0 - lam1) [ sum_units (1 - theta_u) ||W_u||^2 + sum_layers (1 - theta_l) ||W_l||^2 ]
            + gamma * C(theta)``

For a structure that no other contains this is exactly method.md's
``1/2 (lam1 theta + lam0 (1 - theta)) ||W_g||^2``; writing the slab once for every weight
keeps a weight inside both a unit and a gated branch from getting the slab twice. The
plain ``lam1`` term covers ungated weights too: use the optimizer with ``weight_decay=0``.

``C(theta)`` is the exact expected FLOPs/parameter fraction of :mod:`fxprune.cost`
(``PruneConfig.cost="complexity"``) or the expected fraction of kept structures
(``"structures"``); in the penalty the layer gates' share of its gradient is multiplied
by ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx

from .api import EXAMPLE, channel_graph, config_of
from .config import CostReference, PruneConfig
from .cost import ComplexityCost, forward_flops, weight_flop_factors
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


@dataclass
class LayerStructure:
    branch: int
    gate: BernoulliGate
    params: list[Tensor]
    names: list[str]

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
        self.flop_factors = weight_flop_factors(gated)
        self.dense_params = sum(p.numel() for _, p in gated_weights(gated))
        example = gated.meta.get(EXAMPLE)
        self.dense_flops = forward_flops(gated, example) if example is not None else 0
        self.rebuild()
        with torch.no_grad():
            weight_flops, _ = self.complexity.expected(*(torch.ones_like(t, dtype=torch.float64) for t in self.thetas()))
        #: FLOPs of ops without weights (attention products, ...): constant
        self.other_flops = max(self.dense_flops - float(weight_flops), 0.0)
        #: the dense model's FLOPs per example, parameters and gates
        self.reference = CostReference(self.dense_flops, self.dense_params, sum(t.numel() for t in self.thetas()))
        self.ref = self.config.cost_reference or self.reference

    def rebuild(self) -> None:
        gated, cg = self.gated, channel_graph(self.gated)
        #: the model's own parameters; changes only when structures are removed
        self.weights = [p for _, p in gated_weights(gated)]
        params = dict(gated.named_parameters())
        self.units: list[UnitStructure] = []
        for key, gate in gate_modules(gated, UNITS).items():
            g = cg.groups[int(key[1:])]
            slices, elems = [], torch.zeros(g.num_units)
            for b in cg.bindings_of(g):
                if b.target not in params or b.role not in ("producer", "carrier"):
                    continue
                p = params[b.target]
                idx = g.unit_index[b.space]
                t = torch.as_tensor(idx, dtype=torch.long, device=p.device)
                slices.append((p, b.dim, t))
                elems.index_add_(0, t.cpu(), torch.full((len(idx),), p.numel() / len(idx)))
            self.units.append(UnitStructure(g.id, gate, slices, elems))
        self.layers: list[LayerStructure] = []
        nodes = {n.name: n for n in gated.graph.nodes}
        for key, gate in gate_modules(gated, LAYERS).items():
            br = cg.branches[int(key[1:])]
            names: list[str] = []
            for name in br.nodes:
                n = nodes.get(name)
                if n is not None and n.op == "call_module":
                    names += [f"{n.target}.{k}" for k, _ in gated.get_submodule(n.target).named_parameters()]
                elif n is not None and n.op == "get_attr" and n.target in params:
                    names.append(n.target)
            names = [k for k in dict.fromkeys(names) if k in params]
            self.layers.append(LayerStructure(br.id, gate, [params[k] for k in names], names))
        offsets, start = {}, 0
        for u in self.units:
            offsets[u.group], start = start, start + u.gate.theta.numel()
        in_branches: dict[str, list[int]] = {}
        for l in self.layers:
            for k in l.names:
                in_branches.setdefault(k, []).append(l.branch)
        self.complexity = ComplexityCost(
            dict(gated_weights(gated)), cg, offsets, {l.branch: i for i, l in enumerate(self.layers)}, in_branches,
            self.flop_factors)

    @staticmethod
    def unit_sq(u: UnitStructure) -> Tensor:
        """Squared weight norm of each unit (differentiable)."""
        out = u.gate.theta.new_zeros(u.gate.theta.shape)
        for p, dim, idx in u.slices:
            per = p.pow(2).sum(dim=[d for d in range(p.dim()) if d != dim]) if p.dim() > 1 else p.pow(2)
            out = out.index_add(0, idx, per.to(out.dtype))
        return out

    def thetas(self) -> tuple[Tensor, Tensor]:
        """All unit thetas concatenated (in ``self.units`` order) and all layer thetas."""
        ref = next((p for p in self.weights), torch.zeros(()))
        unit = torch.cat([u.gate.theta for u in self.units]) if self.units else ref.new_zeros(0)
        layer = torch.cat([l.gate.theta for l in self.layers]) if self.layers else ref.new_zeros(0)
        return unit, layer

    def _scaled_thetas(self, alpha: float) -> tuple[Tensor, Tensor]:
        """The thetas, with the layer gates' gradient multiplied by ``alpha`` (values unchanged)."""
        unit, layer = self.thetas()
        if alpha != 1.0:
            layer = layer + (alpha - 1.0) * (layer - layer.detach())
        return unit, layer

    def expected(self, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
        """Expected FLOPs and parameters per example; ``alpha`` scales the layer gates' gradient."""
        flops, params = self.complexity.expected(*self._scaled_thetas(alpha))
        return flops + self.other_flops, params

    def cost(self, alpha: float = 1.0) -> Tensor:
        """``"complexity"``: ``C(theta) = beta E[FLOPs]/FLOPs_ref + (1 - beta) E[Params]/Params_ref``;
        ``"structures"``: ``C(theta) = sum_g theta_g / structures_ref`` (every gate the same price)."""
        if self.config.cost == "structures":
            unit, layer = self._scaled_thetas(alpha)
            return (unit.sum() + layer.sum()) / max(self.ref.structures, 1)
        beta = self.config.beta
        flops, params = self.expected(alpha)
        return beta * flops / max(self.ref.flops, 1) + (1 - beta) * params / max(self.ref.params, 1)

    def penalty(self, gamma: float | None = None) -> Tensor:
        """The regulariser; ``gamma`` overrides the config's (the pruner's warm-up ramp)."""
        c = self.config
        gamma = c.gamma if gamma is None else gamma
        device = self.weights[0].device if self.weights else torch.device("cpu")
        slab = 0.5 * c.lam1 * sum((p.pow(2).sum() for p in self.weights), torch.zeros((), device=device))
        spike = torch.zeros((), device=device)
        for u in self.units:
            spike = spike + ((1 - u.gate.theta) * self.unit_sq(u)).sum()
        for l in self.layers:
            spike = spike + (1 - l.gate.theta.sum()) * sum(p.pow(2).sum() for p in l.params)
        return slab + 0.5 * (c.lam0 - c.lam1) * spike + gamma * self.cost(c.alpha)
