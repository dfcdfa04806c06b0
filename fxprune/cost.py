"""The complexity cost of method.md section 3, as an exact polynomial in theta.

``C(theta) = beta * E[FLOPs(xi)] / FLOPs_ref + (1 - beta) * E[Params(xi)] / Params_ref``

where FLOPs and Params are those of the network compacted with gates ``xi``, and the
references are the dense network's own unless ``PruneConfig.cost_reference`` names others.

Every parameter tensor is one term. Its kept size is ``K * n_a * n_b``: ``K`` is the
product of its dimensions that no gated channel space indexes, and ``n_a``, ``n_b`` are the
kept channels of the (at most two) dimensions that one does. A kept-channel count is
linear in the gates of its group (``n = sum_u m(u) xi_u``, ``m(u)`` the channels of unit
``u`` the dimension indexes), so under independent gates

``E[n_a n_b] = E[n_a] E[n_b] + [same group] sum_u m_a(u) m_b(u) theta_u (1 - theta_u)``.

A dimension indexed by a product group (a width viewed into heads x head_dim) counts
``n = sum_u m(u) xi_h(u) xi_d(u)``: a unit is kept when its head and its head_dim entry
are, two independent gates, so ``E[n] = sum_u m(u) theta_h(u) theta_d(u)``.

A term inside residual branches is multiplied by their layer gates' theta. The FLOPs of
a weight are its kept size times the FLOPs per entry the analysis recorded
(:attr:`fxprune.passes.channel_graph.Param.flops`, as ``FlopCounterMode`` counts them);
A matmul of two activations (attention written out: ``q @ k^T`` over heads and head_dim,
``attn @ v`` over heads and v's head_dim) is one term too, with no parameters: its FLOPs
per combination of its channels (:class:`~fxprune.passes.channel_graph.OpFlops`) times the
kept channels of its (at most two) pruned dims. Other ops without weights are a constant
measured on the dense model; so is a fused ``F.scaled_dot_product_attention``, which
``FlopCounterMode`` counts on some devices and not on others (not on the CPU). Everything reads the
ChannelGraph (parameters by identity: a tied weight is one term) and is evaluated with
``index_add`` and gathers over the flat theta buffer: no Python loop per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .gates import factor_slots
from .passes.channel_graph import ChannelGraph
from .state import run_example

__all__ = ["ComplexityCost", "forward_flops", "count_flops", "counted_run"]


def counted_run(model: nn.Module, example: tuple) -> tuple[Any, Any]:
    """:func:`fxprune.state.run_example` (``model`` on ``example`` in eval mode, without
    grad) under ``FlopCounterMode``: ``(counter, output)``, the counter with totals and
    per-module counts, the output what the plain run computes (the counter only observes)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = run_example(model, example)
    return counter, out


def count_flops(model: nn.Module, example: tuple):
    """The ``FlopCounterMode`` of one eval run of ``model`` on ``example`` (:func:`counted_run`)."""
    return counted_run(model, example)[0]


def forward_flops(model: nn.Module, example: tuple) -> int:
    """Forward FLOPs of ``model`` on ``example`` in eval mode, as ``FlopCounterMode`` counts them."""
    return count_flops(model, example).get_total_flops()


@dataclass
class _Terms:
    """One row per parameter tensor."""

    k: Tensor  # entries per kept channel combination
    flops: Tensor  # FLOPs per kept entry (0: no FLOPs)
    params: Tensor  # 1 for a parameter, 0 for an op without weights
    dim_a: Tensor  # index into the expected-count vector (last index = constant 1)
    dim_b: Tensor
    branches: Tensor  # [terms, depth] flat indices of layer thetas (index n = constant 1)
    # expected counts: E[n_d] = sum over entries (row d, theta col, multiplicity)
    count_rows: Tensor
    count_cols: Tensor
    count_cols2: Tensor  # a second theta col multiplied in (a product group's head_dim); size = constant 1
    count_vals: Tensor
    # variance of same-group pairs: term row, theta col, m_a * m_b
    var_rows: Tensor
    var_cols: Tensor
    var_vals: Tensor
    num_dims: int
    floors: Tensor  # [num_dims + 1]: the channels a dimension keeps at least (its group's floor)
    # multiple_of: expected units per gated group (group row, theta col), the groups' unit counts and
    # floors, and the one or two groups whose rounded width scales each dimension (num_groups: none)
    unit_rows: Tensor
    unit_cols: Tensor
    group_units: Tensor
    group_floors: Tensor
    dim_groups: Tensor  # [num_dims + 1, 2]
    multiple: int


def _floor_channels(cg: ChannelGraph, gid: int, m: np.ndarray, floors: dict[int, int], product: bool) -> float:
    """The channels a dimension of group ``gid`` (``m``: its channels per unit) keeps at
    least when the group keeps its floor of units: the floor's units of fewest channels (a
    product group: its heads' floor times its head_dims')."""
    if product:
        keep = int(np.prod([min(floors.get(f, 1), cg.groups[f].num_units) for f in
                            (ids[0] for ids in cg.groups[gid].factor_ids())]))
    else:
        keep = floors.get(gid, 1)
    return float(np.sort(m)[:keep].sum())


class ComplexityCost:
    """``E[FLOPs]`` and ``E[Params]`` of the compacted network as a polynomial in the
    flat theta vector: one term per parameter in ``names`` (canonical names of ``cg``),
    ``units`` (group id -> flat slice) and ``layers`` (branch id -> flat index) the gated
    structures, ``size`` the length of the theta vector."""

    def __init__(self, cg: ChannelGraph, names: list[str], units: dict[int, slice], layers: dict[int, int], size: int,
                 device: torch.device | str = "cpu", floors: dict[int, int] | None = None,
                 multiple_of: int | None = None) -> None:
        floors = floors or {}
        group_index = {g: j for j, g in enumerate(units)}
        dim_groups: list[list[int]] = []
        rows_k, rows_f, rows_p, dims_a, dims_b, rows_br, slot_floors = [], [], [], [], [], [], []
        c_rows, c_cols, c_cols2, c_vals, v_rows, v_cols, v_vals = [], [], [], [], [], [], []
        products = {g: slots for g in cg.groups if (slots := factor_slots(cg, units, g)) is not None and slots.shape[1] == 2}
        bound: dict[str, dict[int, tuple[int, int | None]]] = {}
        for b in cg.bindings:
            bound.setdefault(b.param, {})[b.dim] = (b.space, b.period)
        # one term per parameter (its entries, FLOPs per entry, bound dims), then one per op without weights
        # whose FLOPs follow channels (per_entry FLOPs for each combination of its spaces' channels; no parameters)
        specs = [(name, float(cg.params[name].numel), cg.params[name].flops, 1.0, cg.params[name].shape,
                  sorted(bound.get(name, {}).items()), cg.params[name].branches) for name in names]
        specs += [(o.node, o.per_entry * float(np.prod([cg.spaces[s].size for s in o.spaces])), 1.0, 0.0,
                   tuple(cg.spaces[s].size for s in o.spaces), [(i, (s, None)) for i, s in enumerate(o.spaces)], o.branches)
                  for o in cg.op_flops]
        n_dims = 0
        for name, dense, flops, is_param, shape, dims, branches in specs:
            k, gated_dims = dense, []
            for dim, (sid, period) in dims:
                gid = cg.spaces[sid].group
                if gid in units or gid in products:
                    k /= shape[dim]
                    unit_of = cg.groups[gid].unit_index[sid]
                    unit_of = unit_of[: period] if period else unit_of
                    gated_dims.append((gid, np.bincount(unit_of, minlength=cg.groups[gid].num_units)))
            if len(gated_dims) > 2 and not is_param:  # an op over three pruned dims: held at its dense FLOPs
                k, gated_dims = dense, []
            if len(gated_dims) > 2:
                raise NotImplementedError(f"parameter '{name}' has more than two pruned dimensions")
            slots = []
            for gid, m in gated_dims:
                cols = np.flatnonzero(m)
                c_rows.append(np.full(len(cols), n_dims))
                # a unit of a product group is kept with probability theta(head) * theta(head_dim)
                first, second = products[gid][cols].T if gid in products else (units[gid].start + cols, np.full(len(cols), size))
                c_cols.append(first)
                c_cols2.append(second)
                c_vals.append(m[cols])
                slot_floors.append(_floor_channels(cg, gid, m, floors, gid in products))
                factors = [ids[0] for ids in cg.groups[gid].factor_ids()] if gid in products else [gid]
                dim_groups.append(([group_index[f] for f in factors if f in group_index] + [len(units)] * 2)[:2])
                slots.append(n_dims)
                n_dims += 1
            if len(gated_dims) == 2 and gated_dims[0][0] == gated_dims[1][0] and gated_dims[0][0] in units:
                gid, ma, mb = gated_dims[0][0], gated_dims[0][1], gated_dims[1][1]
                cols = np.flatnonzero(ma * mb)
                v_rows.append(np.full(len(cols), len(rows_k)))
                v_cols.append(units[gid].start + cols)
                v_vals.append((ma * mb)[cols])
            slots += [-1] * (2 - len(slots))
            rows_k.append(k)
            rows_f.append(flops)
            rows_p.append(is_param)
            dims_a.append(slots[0])
            dims_b.append(slots[1])
            rows_br.append([layers[i] for i in branches if i in layers])
        depth = max((len(r) for r in rows_br), default=0)
        cat = lambda xs, dt: torch.as_tensor(np.concatenate(xs) if xs else np.zeros(0), dtype=dt, device=device)
        self.size = size
        self.terms = _Terms(
            k=torch.tensor(rows_k, dtype=torch.float64, device=device),
            flops=torch.tensor(rows_f, dtype=torch.float64, device=device),
            params=torch.tensor(rows_p, dtype=torch.float64, device=device),
            dim_a=torch.tensor([d if d >= 0 else n_dims for d in dims_a], dtype=torch.long, device=device),
            dim_b=torch.tensor([d if d >= 0 else n_dims for d in dims_b], dtype=torch.long, device=device),
            branches=torch.tensor([r + [size] * (depth - len(r)) for r in rows_br], dtype=torch.long,
                                  device=device).reshape(len(rows_br), depth),
            count_rows=cat(c_rows, torch.long), count_cols=cat(c_cols, torch.long), count_cols2=cat(c_cols2, torch.long),
            count_vals=cat(c_vals, torch.float64),
            var_rows=cat(v_rows, torch.long), var_cols=cat(v_cols, torch.long), var_vals=cat(v_vals, torch.float64),
            num_dims=n_dims,
            floors=torch.tensor(slot_floors + [0.0], dtype=torch.float64, device=device),
            unit_rows=torch.as_tensor(np.concatenate([np.full(sl.stop - sl.start, j) for j, sl in enumerate(units.values())])
                                      if units else np.zeros(0), dtype=torch.long, device=device),
            unit_cols=torch.as_tensor(np.concatenate([np.arange(sl.start, sl.stop) for sl in units.values()])
                                      if units else np.zeros(0), dtype=torch.long, device=device),
            group_units=torch.tensor([sl.stop - sl.start for sl in units.values()] + [1], dtype=torch.float64, device=device),
            group_floors=torch.tensor([min(floors.get(g, 1), sl.stop - sl.start) for g, sl in units.items()] + [1],
                                      dtype=torch.float64, device=device),
            dim_groups=torch.tensor(dim_groups + [[len(units)] * 2], dtype=torch.long, device=device).reshape(-1, 2),
            multiple=multiple_of if multiple_of and multiple_of > 1 else 1,
        )

    def _rounding(self, theta: Tensor) -> Tensor:
        """Per dimension, how much wider ``multiple_of`` keeps it than its expected count:
        ``R(max(E[n], floor)) / max(E[n], floor)`` for each gated group scaling it, ``R``
        rounding a width up to a multiple of ``k`` (a group of fewer than ``k`` units stays
        whole). A constant factor: the gradient is the expected count's."""
        t = self.terms
        k = float(t.multiple)
        e = theta.new_zeros(*theta.shape[:-1], t.group_units.numel()).index_add(-1, t.unit_rows, theta[..., t.unit_cols])
        e = torch.maximum(e.detach(), t.group_floors)
        e[..., -1] = 1.0
        rounded = torch.where(t.group_units < k, t.group_units, torch.minimum(t.group_units, torch.ceil(e / k - 1e-9) * k))
        ratio = rounded / e
        ratio = ratio[..., t.dim_groups[:, 0]] * ratio[..., t.dim_groups[:, 1]]
        ratio[..., -1] = 1.0  # the constant slot
        return ratio

    def expected(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(E[FLOPs from weights], E[Params])`` per example, differentiable in ``theta``
        (the flat vector; layer entries multiply the terms inside their branches). A batch
        of theta vectors (``[..., size]``) gives a batch of each."""
        t = self.terms
        dtype = torch.float64
        theta = theta.to(dtype)
        lead = theta.shape[:-1]
        base = theta.new_zeros(*lead, t.num_dims + 1)
        base[..., -1] = 1.0  # the constant slot of parameters with fewer than two pruned dimensions
        lt = torch.cat([theta, theta.new_ones(*lead, 1)], -1)
        counts = base.index_add(-1, t.count_rows, lt[..., t.count_cols] * lt[..., t.count_cols2] * t.count_vals)
        counts = torch.maximum(counts, t.floors)  # a group at its floor saves nothing more
        if t.multiple > 1:
            counts = counts * self._rounding(theta)
        size = counts[..., t.dim_a] * counts[..., t.dim_b]
        if t.var_rows.numel():
            q = theta * (1 - theta)
            size = size.index_add(-1, t.var_rows, q[..., t.var_cols] * t.var_vals)
        if t.branches.shape[1]:
            size = size * lt[..., t.branches].prod(-1)
        size = size * t.k
        return (size * t.flops).sum(-1), (size * t.params).sum(-1)
