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

A term inside residual branches is multiplied by their layer gates' theta. The FLOPs of
a convolution or linear weight are its kept size times twice the output positions per
example (input positions for a transposed convolution), as ``FlopCounterMode`` counts
them; FLOPs of ops without weights (attention products) are a constant. Everything is
evaluated with ``index_add`` and gathers: no Python loop per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, fx, nn

from .passes.channel_graph import ChannelGraph
from .passes.op_helpers import shape as _shape

__all__ = ["ComplexityCost", "weight_flop_factors", "forward_flops", "count_flops"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FUNCTIONAL = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d, torch.nn.functional.linear}


def weight_flop_factors(gm: fx.GraphModule) -> dict[str, float]:
    """FLOPs per example per weight entry, for every conv and linear weight of ``gm``
    (from the shapes ShapeProp recorded at tracing)."""
    batch = next((s[0] for n in gm.graph.nodes if n.op == "placeholder" and (s := _shape(n))), 1)
    out: dict[str, float] = {}
    for node in gm.graph.nodes:
        src = node.args[0] if node.args else None
        while isinstance(src, fx.Node) and _shape(src) is None and src.args:  # gate reads carry no shapes
            src = src.args[0]
        y, x = _shape(node), _shape(src)
        if y is None or x is None:
            continue
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, _CONVT):
                out[f"{node.target}.weight"] = 2.0 * math.prod(x[2:]) * x[0] / batch
            elif isinstance(m, _CONV):
                out[f"{node.target}.weight"] = 2.0 * math.prod(y[2:]) * y[0] / batch
            elif isinstance(m, nn.Linear):
                out[f"{node.target}.weight"] = 2.0 * math.prod(y[:-1]) / batch
        elif node.op == "call_function" and node.target in _FUNCTIONAL and len(node.args) > 1:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                positions = math.prod(y[:-1]) if node.target is torch.nn.functional.linear else math.prod(y[2:]) * y[0]
                out[w.target] = 2.0 * positions / batch
    return out


@torch.no_grad()
def count_flops(model: nn.Module, example: tuple):
    """Run ``model`` on ``example`` (moved to its device) once in eval mode under
    ``FlopCounterMode`` and return the counter (totals and per-module counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = tuple(t.to(device) if isinstance(t, Tensor) else t for t in example)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(*example)
    finally:
        model.train(was_training)
    return counter


def forward_flops(gm: nn.Module, example: tuple) -> int:
    """Forward FLOPs of ``gm`` on ``example`` in eval mode, as ``FlopCounterMode`` counts them."""
    return count_flops(gm, example).get_total_flops()


@dataclass
class _Terms:
    """One row per parameter tensor."""

    k: Tensor  # entries per kept channel combination
    flops: Tensor  # FLOPs per kept entry (0: no FLOPs)
    dim_a: Tensor  # index into the expected-count vector (last index = constant 1)
    dim_b: Tensor
    branches: Tensor  # [terms, depth] indices into layer thetas (last index = constant 1)
    # expected counts: E[n_d] = sum over entries (row d, theta col, multiplicity)
    count_rows: Tensor
    count_cols: Tensor
    count_vals: Tensor
    # variance of same-group pairs: term row, theta col, m_a * m_b
    var_rows: Tensor
    var_cols: Tensor
    var_vals: Tensor
    num_dims: int


class ComplexityCost:
    """``C(theta)`` of a gated model: build with the model's parameters, gates and
    channel graph; call with the concatenated unit thetas and layer thetas."""

    def __init__(
        self,
        params: dict[str, Tensor],
        cg: ChannelGraph,
        unit_offsets: dict[int, int],
        branch_slots: dict[int, int],
        param_branches: dict[str, list[int]],
        flop_factors: dict[str, float],
    ) -> None:
        rows_k, rows_f, dims_a, dims_b, rows_br = [], [], [], [], []
        c_rows, c_cols, c_vals, v_rows, v_cols, v_vals = [], [], [], [], [], []
        bound: dict[str, dict[int, int]] = {}
        for b in cg.bindings:
            bound.setdefault(b.target, {})[b.dim] = b.space
        n_dims = 0
        for name, p in params.items():
            k, gated_dims = float(p.numel()), []
            for dim, sid in sorted(bound.get(name, {}).items()):
                gid = cg.spaces[sid].group
                if gid in unit_offsets:
                    k /= p.shape[dim]
                    units = cg.groups[gid].unit_index[sid][: p.shape[dim]]
                    gated_dims.append((gid, np.bincount(units, minlength=cg.groups[gid].num_units)))
            if len(gated_dims) > 2:
                raise NotImplementedError(f"parameter '{name}' has more than two pruned dimensions")
            slots = []
            for gid, m in gated_dims:
                cols = np.flatnonzero(m)
                c_rows.append(np.full(len(cols), n_dims))
                c_cols.append(unit_offsets[gid] + cols)
                c_vals.append(m[cols])
                slots.append(n_dims)
                n_dims += 1
            if len(gated_dims) == 2 and gated_dims[0][0] == gated_dims[1][0]:
                gid, ma, mb = gated_dims[0][0], gated_dims[0][1], gated_dims[1][1]
                cols = np.flatnonzero(ma * mb)
                v_rows.append(np.full(len(cols), len(rows_k)))
                v_cols.append(unit_offsets[gid] + cols)
                v_vals.append((ma * mb)[cols])
            slots += [-1] * (2 - len(slots))
            rows_k.append(k)
            rows_f.append(flop_factors.get(name, 0.0))
            dims_a.append(slots[0])
            dims_b.append(slots[1])
            rows_br.append([branch_slots[i] for i in param_branches.get(name, []) if i in branch_slots])
        depth = max((len(r) for r in rows_br), default=0)
        dev = next(iter(params.values())).device if params else torch.device("cpu")
        cat = lambda xs, dt: torch.as_tensor(np.concatenate(xs) if xs else np.zeros(0), dtype=dt, device=dev)  # noqa: E731
        one = len(branch_slots)  # the constant-1 slot after the layer thetas
        self.terms = _Terms(
            k=torch.tensor(rows_k, dtype=torch.float64, device=dev),
            flops=torch.tensor(rows_f, dtype=torch.float64, device=dev),
            dim_a=torch.tensor([d if d >= 0 else n_dims for d in dims_a], dtype=torch.long, device=dev),
            dim_b=torch.tensor([d if d >= 0 else n_dims for d in dims_b], dtype=torch.long, device=dev),
            branches=torch.tensor([r + [one] * (depth - len(r)) for r in rows_br], dtype=torch.long,
                                  device=dev).reshape(len(rows_br), depth),
            count_rows=cat(c_rows, torch.long), count_cols=cat(c_cols, torch.long), count_vals=cat(c_vals, torch.float64),
            var_rows=cat(v_rows, torch.long), var_cols=cat(v_cols, torch.long), var_vals=cat(v_vals, torch.float64),
            num_dims=n_dims,
        )

    def expected(self, unit_theta: Tensor, layer_theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(E[FLOPs from weights], E[Params])`` per example, differentiable in both thetas."""
        t = self.terms
        dtype = unit_theta.dtype if unit_theta.numel() else layer_theta.dtype
        base = unit_theta.new_zeros(t.num_dims + 1, dtype=dtype)
        base[-1] = 1.0  # the constant slot of parameters with fewer than two pruned dimensions
        counts = base.index_add(0, t.count_rows, unit_theta[t.count_cols] * t.count_vals.to(dtype))
        size = counts[t.dim_a] * counts[t.dim_b]
        if t.var_rows.numel():
            q = unit_theta * (1 - unit_theta)
            size = size.index_add(0, t.var_rows, q[t.var_cols] * t.var_vals.to(dtype))
        if t.branches.shape[1]:
            lt = torch.cat([layer_theta, layer_theta.new_ones(1)])
            size = size * lt[t.branches].prod(1)
        size = size * t.k.to(dtype)
        return (size * t.flops.to(dtype)).sum(), size.sum()
