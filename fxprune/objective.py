"""The regulariser of method.md section 2: GSM weight prior and the complexity cost.

``penalty() = 1/2 lam1 ||W||^2
            + 1/2 (lam0 - lam1) [ sum_units (1 - theta_u) ||W_u||^2 + sum_layers (1 - theta_l) ||W_l||^2 ]
            + gamma * C(theta)``

For a structure that no other contains this is exactly method.md's
``1/2 (lam1 theta + lam0 (1 - theta)) ||W_g||^2``; writing the slab once for every weight
keeps a weight inside both a unit and a gated branch from getting the slab twice. The
plain ``lam1`` term covers ungated weights too: use the optimizer with ``weight_decay=0``.

The weights are the ChannelGraph's parameters by identity (a tied weight counts once;
a projection shortcut that ``residualize`` added is a weight like any other). Every
term is computed from index tensors built once per removal: one squared-sum per weight
tensor, then ``index_add`` into the flat theta layout; no Python loop over units.

``C(theta)`` is the exact expected FLOPs/parameter fraction of :mod:`fxprune.cost`
(``PruneConfig.cost="complexity"``) or the expected fraction of kept structures
(``"structures"``); in the penalty the layer gates' share of its gradient is multiplied
by ``alpha``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, fx, nn

from .config import EXEMPT_KINDS, CostReference, PruneConfig
from .cost import ComplexityCost, forward_flops
from .gates import factor_slots
from .state import gate_bank, state_of

__all__ = ["Objective", "prior_exempt", "EXEMPT_KINDS"]

_EMBEDDING_CALLS = {torch.nn.functional.embedding, torch.embedding}


def prior_exempt(model: nn.Module, kinds: tuple[str, ...] = EXEMPT_KINDS) -> set[str]:
    """The names of ``model``'s parameters of ``kinds`` (as timm's and the Hugging Face
    Trainer's no-decay groups): ``"bias"`` (a name ending in ``bias``), ``"norm"`` (any
    other parameter of at most one dimension: norm gains, layer scales) and
    ``"embedding"`` (the table of an ``nn.Embedding``, or the weight of an
    ``F.embedding`` call in a traced graph).

    Example::

        >>> sorted(prior_exempt(nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 2))))
        ['0.weight', '1.bias', '1.weight', '2.bias']
    """
    out: set[str] = set()
    params = dict(model.named_parameters(remove_duplicate=False))
    embedding_of: set[int] = set()
    if "embedding" in kinds:
        embedding_of = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for node in model.graph.nodes if isinstance(model, fx.GraphModule) else ():
            if node.op == "call_function" and node.target in _EMBEDDING_CALLS:
                weight = node.args[0] if node.target is torch.embedding else \
                    node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
                if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in params:
                    embedding_of.add(id(params[weight.target]))
    for name, p in params.items():
        bias = name.rpartition(".")[2].endswith("bias")
        if ("bias" in kinds and bias) or ("embedding" in kinds and id(p) in embedding_of) or \
                ("norm" in kinds and p.dim() <= 1 and not bias):
            out.add(name)
    return out


class Objective:
    """The penalty of a gated model. Its index tensors are derived from the model as it
    is: every entry point re-derives them (:meth:`sync`) when the state's version (a live
    removal) or the thetas' device has changed."""

    def __init__(self, gated: fx.GraphModule, config: PruneConfig | None = None, *, decoupled: bool = False) -> None:
        self.gated = gated
        #: the weights get the prior through :meth:`prior_gradients` at the optimizer's step, not through the loss
        self.decoupled = decoupled
        state = state_of(gated)
        self.config = config or state.config
        self.rebuild()
        if state.dense_cost is None:
            if state.version:
                raise RuntimeError("the gated model has had live removals and its dense cost was not recorded: build "
                                   "the Pruner (or an Objective) before removing structures")
            with torch.no_grad():
                weight_flops, params = self.complexity.expected(torch.ones(self.size, dtype=torch.float64))
            flops = forward_flops(gated, state.example)
            state.dense_cost = (CostReference(flops, round(float(params)), self.size),
                                max(flops - float(weight_flops), 0.0))
        #: the dense model's FLOPs per example, parameters and gates (the prepared model's, after removals too)
        self.reference, self.other_flops = state.dense_cost  # other_flops: of ops without weights, constant
        self.dense_flops, self.dense_params = self.reference.flops, self.reference.params
        self.ref = self.config.cost_reference or self.reference

    # ------------------------------------------------------------------ index tensors
    def _key(self) -> tuple[int, torch.device]:
        return state_of(self.gated).version, gate_bank(self.gated).theta.device

    def sync(self) -> None:
        """Re-derive the index tensors if the model changed (a removal, a device move)
        since they were built."""
        if self._stamp != self._key():
            self.rebuild()

    def rebuild(self) -> None:
        """Re-read the weights, the layout and the ChannelGraph."""
        self._stamp: tuple[int, torch.device] | None = None  # a rebuild that fails half way is redone at the next use
        state = state_of(self.gated)
        cg, layout = state.graph, state.layout
        named = dict(self.gated.named_parameters(remove_duplicate=False))
        #: the model's own parameters by canonical name (by identity, gates excluded): what the cost counts
        self.names = [c for c, p in cg.params.items()
                      if p.used and not p.buffer and any(n in named for n in p.names)]
        exempt = prior_exempt(self.gated, self.config.prior_exempt)
        #: the parameters the weight prior decays (``PruneConfig.prior_exempt`` left out)
        self.prior_names = [c for c in self.names if not exempt.intersection(cg.params[c].names)]
        self.weights: list[Tensor] = [next(named[n] for n in cg.params[c].names if n in named) for c in self.prior_names]
        position = {c: i for i, c in enumerate(self.prior_names)}
        self.size = layout.size
        device = gate_bank(self.gated).theta.device
        # one row vector per weight: squared sums along its unit dim (or its total)
        self._row_dims: list[tuple[int, ...] | None] = [None] * len(self.weights)
        row_slots: list[np.ndarray] = [np.array([self.size])] * len(self.weights)
        elems = np.zeros(self.size + 1)
        self._unit_channels: list[tuple[Tensor, int, np.ndarray]] = []
        #: (weight, slots): a weight's rows counted again, for the second factor of a product group
        self._more_rows: list[tuple[int, np.ndarray]] = []
        for b in cg.bindings:
            gid = cg.spaces[b.space].group
            if b.role == "consumer" or b.param not in position:
                continue
            if gid in layout.units:
                slot_sets = [layout.unit_slots(gid, cg.groups[gid].unit_index[b.space])]
            elif (product := factor_slots(cg, layout.units, gid)) is not None:  # a row belongs to its head and its head_dim
                slot_sets = list(product[cg.groups[gid].unit_index[b.space]].T)
            else:
                continue
            i = position[b.param]
            w = self.weights[i]
            self._row_dims[i] = tuple(d for d in range(w.dim()) if d != b.dim)
            row_slots[i] = slot_sets[0]
            self._more_rows += [(i, slots) for slots in slot_sets[1:]]
            for slots in slot_sets:
                self._unit_channels.append((w, b.dim, slots))
                np.add.at(elems, slots, w.numel() / w.shape[b.dim])
        owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(row_slots)]) if row_slots else np.zeros(0)
        self._row_slot = torch.as_tensor(np.concatenate(row_slots) if row_slots else np.zeros(0), dtype=torch.long,
                                         device=device)
        self._row_owner = torch.as_tensor(owner, dtype=torch.long, device=device)
        start = np.concatenate([[0], np.cumsum([len(s) for s in row_slots])])
        # the rows counted again (positions in the concatenated rows) and the slots they go to
        self._more_row = torch.as_tensor(np.concatenate([start[i] + np.arange(len(s)) for i, s in self._more_rows])
                                         if self._more_rows else np.zeros(0), dtype=torch.long, device=device)
        self._more_slot = torch.as_tensor(np.concatenate([s for _, s in self._more_rows]) if self._more_rows else np.zeros(0),
                                          dtype=torch.long, device=device)
        pairs = [(position[c], slot) for b, slot in layout.layers.items() for c in cg.branches[b].params if c in position]
        self._layer_w = torch.as_tensor([w for w, _ in pairs], dtype=torch.long, device=device)
        self._layer_s = torch.as_tensor([s for _, s in pairs], dtype=torch.long, device=device)
        self._branch_weights: dict[int, list[Tensor]] = {}
        for b in layout.layers:
            self._branch_weights[b] = [self.weights[position[c]] for c in cg.branches[b].params if c in position]
        for w, s in pairs:
            elems[s] += self.weights[w].numel()
        #: weight entries of every structure (units: in its producers and carriers; layers: in its branch)
        self.elems = torch.as_tensor(elems[: self.size], dtype=torch.float32, device=device)
        self.is_layer = torch.as_tensor(layout.is_layer(), device=device)
        self.complexity = ComplexityCost(cg, self.names, layout.units, layout.layers, self.size, device,
                                         gate_bank(self.gated).floors, self.config.multiple_of)
        self._stamp = self._key()

    def unit_channels(self) -> list[tuple[Tensor, int, np.ndarray]]:
        """``(weight, dim, flat unit slot of every index of that dim)`` for every producer
        and carrier slice of a gated group: a unit's own weights ``W_g``."""
        self.sync()
        return self._unit_channels

    def branch_weights(self, branch: int) -> list[Tensor]:
        """The weights inside gated ``branch`` (removed with it)."""
        self.sync()
        return self._branch_weights[branch]

    def layer_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """``(weight, slot)`` pairs, as two index arrays: weight ``weights[w]`` lies inside the
        branch of layer gate ``slot``."""
        self.sync()
        return self._layer_w.cpu().numpy(), self._layer_s.cpu().numpy()

    # ------------------------------------------------------------------ terms
    def theta(self) -> Tensor:
        """The flat theta buffer (units of every gated group, then layer gates), with the
        index tensors following the model (:meth:`sync`)."""
        self.sync()
        return gate_bank(self.gated).theta

    def squared_norms(self) -> tuple[Tensor, Tensor]:
        """``(||W||^2 per weight tensor, ||W_g||^2 per structure)``, differentiable."""
        self.sync()
        squares = torch._foreach_mul(self.weights, self.weights) if self.weights else []
        rows = [s.sum().reshape(1) if dims is None else s.sum(dims) if dims else s
                for s, dims in zip(squares, self._row_dims)]
        dtype = self.theta().dtype
        flat = torch.cat(rows).to(dtype) if rows else torch.zeros(0, dtype=dtype)
        per_weight = flat.new_zeros(len(self.weights)).index_add(0, self._row_owner, flat)
        per_structure = flat.new_zeros(self.size + 1).index_add(0, self._row_slot, flat)[: self.size]
        if self._more_rows:
            per_structure = per_structure.index_add(0, self._more_slot, flat[self._more_row])
        per_structure = per_structure.index_add(0, self._layer_s, per_weight[self._layer_w])
        return per_weight, per_structure

    def prior_gradients(self) -> list[Tensor]:
        """``d prior / dW`` for every weight of :attr:`weights` at the current thetas (the
        slab on every decayed weight, the spike on a structure's weights as it is
        switched off): what a decoupled prior subtracts, times the learning rate."""
        self.sync()
        if not self.weights:
            return []
        c = self.config
        theta = self.theta().detach()
        with torch.enable_grad():
            per_weight, per_structure = self.squared_norms()
            prior = 0.5 * c.lam1 * per_weight.sum() + 0.5 * (c.lam0 - c.lam1) * ((1 - theta) * per_structure).sum()
            return list(torch.autograd.grad(prior, self.weights, allow_unused=True, materialize_grads=True))

    @torch.no_grad()
    def decay_(self, optimizer: torch.optim.Optimizer) -> None:
        """The decoupled prior's step: every weight ``optimizer`` trains moves by
        ``-lr * d prior / dW``, with its parameter group's learning rate."""
        lrs = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        grads = self.prior_gradients()
        for w, g in zip(self.weights, grads):
            if id(w) in lrs:
                w.sub_(g.to(w.dtype), alpha=lrs[id(w)])

    def scaled_theta(self, alpha: float = 1.0) -> Tensor:
        """The thetas, with the layer gates' gradient multiplied by ``alpha`` (values unchanged)."""
        return self.scaled_theta_of(self.theta(), alpha)

    def scaled_theta_of(self, theta: Tensor, alpha: float = 1.0) -> Tensor:
        """``theta`` (a flat vector of this layout) with the layer gates' gradient multiplied by ``alpha``."""
        if alpha != 1.0:
            theta = theta + (alpha - 1.0) * (theta - theta.detach()) * self.is_layer
        return theta

    def expected(self, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
        """Expected FLOPs and parameters per example; ``alpha`` scales the layer gates' gradient."""
        self.sync()
        flops, params = self.complexity.expected(self.scaled_theta(alpha))
        return flops + self.other_flops, params

    def cost(self, alpha: float = 1.0) -> Tensor:
        """``"complexity"``: ``C(theta) = beta E[FLOPs]/FLOPs_ref + (1 - beta) E[Params]/Params_ref``;
        ``"structures"``: ``C(theta) = sum_g theta_g / structures_ref`` (every gate the same price);
        ``"gates"``: ``C(theta) = sum_g theta_g`` (every gate costs ``gamma`` of task loss)."""
        if self.config.cost == "structures":
            return self.scaled_theta(alpha).sum() / max(self.ref.structures, 1)
        if self.config.cost == "gates":
            return self.scaled_theta(alpha).sum()
        beta = self.config.beta
        flops, params = self.expected(alpha)
        return beta * flops / max(self.ref.flops, 1) + (1 - beta) * params / max(self.ref.params, 1)

    def fractions(self, alpha: float = 1.0) -> dict[str, Tensor]:
        """Expected FLOPs and parameters as fractions of the dense model's (what a budget
        ``target_flops`` / ``target_params`` is compared with)."""
        return self.fractions_at(self.scaled_theta(alpha))

    def fractions_at(self, theta: Tensor) -> dict[str, Tensor]:
        """:meth:`fractions` at the given thetas; at 0/1 thetas, the fractions of the
        compact model those gates make."""
        self.sync()
        flops, params = self.complexity.expected(theta)
        flops = flops + self.other_flops
        return {"flops": flops / max(self.reference.flops, 1), "params": params / max(self.reference.params, 1)}

    def penalty(self, gamma: float | None = None, multipliers: dict[str, Tensor] | None = None,
                targets: dict[str, float] | None = None) -> Tensor:
        """The regulariser. ``gamma`` overrides the config's (the pruner's warm-up ramp);
        with ``multipliers`` (budgets: ``{"flops": lambda, "params": mu}``) the cost term is
        ``sum_k multiplier_k * max(fraction_k - target_k, 0)`` instead of ``gamma * C``: an
        exact penalty, which pushes the cost down to its target and no further."""
        c = self.config
        theta = self.theta()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoupled):  # decoupled: theta's gradient only
            per_weight, per_structure = self.squared_norms()
        spike = ((1 - theta) * per_structure).sum()
        prior = 0.5 * c.lam1 * per_weight.sum() + 0.5 * (c.lam0 - c.lam1) * spike
        if c.sharpen:
            prior = prior + c.sharpen * (theta * (1 - theta)).sum()
        if multipliers is None and gamma is None and c.gamma is None:  # a budget, outside a Pruner
            multipliers = dict.fromkeys(c.targets, 1.0)
        if multipliers:
            fractions = self.fractions(c.alpha)
            targets = c.targets if targets is None else targets
            return prior + sum(m * (fractions[k] - targets[k]).clamp_min(0) for k, m in multipliers.items()).to(theta.dtype)
        gamma = c.gamma if gamma is None else gamma
        if not gamma:  # no cost term (a budget's is the controller's): its polynomial is not evaluated
            return prior
        return prior + gamma * self.cost(c.alpha).to(theta.dtype)
