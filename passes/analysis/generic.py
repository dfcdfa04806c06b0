"""Helpers and generic rules shared by the op rule tables.

A rule gets the analysis builder and one fx node, records what the op ties, produces,
consumes or carries, and returns the channel dims of the node's output (``{dim: space}``,
or a list of those for ops that return several tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import fx

from .builder import Builder
from .nodes import arg, describe, is_tensor, norm_dim, shape, tensor_args

__all__ = [
    "Dims", "Rule", "arg", "shape", "is_tensor", "tensor_args", "describe", "norm_dim", "unknown", "passthrough",
    "no_tensor", "broadcast", "matmul", "spatial", "pad", "roll", "freeze_dims", "freeze_trailing", "along_dim",
    "mix_along", "reduce", "vector_norm",
]

Dims = dict[int, int]
Rule = Callable[[Builder, fx.Node], Any]


# ----------------------------------------------------------------------------- generic rules
def unknown(b: Builder, node: fx.Node, why: str | None = None) -> Dims:
    why = why or f"read by '{node.name}' ({describe(b, node)}), an op the analysis does not understand"
    for t in tensor_args(node):
        for s in b.dims_of(t).values():
            b.freeze(s, why)
    return {}


def passthrough(b: Builder, node: fx.Node) -> Dims:
    """Element-wise unary ops: output channels are the input's (a parameter read directly,
    ``logit_scale.clamp(max=m).exp()``, carries its channels through)."""
    x = tensor_args(node)
    return dict(b.tensor_dims(x[0])) if x else {}


def no_tensor(b: Builder, node: fx.Node) -> Dims:
    return {}


def _tie_broadcast(b: Builder, ts: list[fx.Node], out_shape: Any, n: int,
                   dims_of: Callable[[fx.Node], dict[int, int]]) -> Dims:
    """The first ``n`` output dims of a broadcast over ``ts`` (aligned at their ends): the
    full-size operand dims of each are tied, and the output dim takes their space."""
    nd, out = len(out_shape), {}
    for d in range(n):
        cands = []
        for t in ts:
            k = d - (nd - len(shape(t)))
            if k >= 0 and not (shape(t)[k] == 1 and out_shape[d] != 1):
                cands.append((t, k))
        tracked = [dims_of(t)[k] for t, k in cands if k in dims_of(t)]
        if not tracked:
            continue
        s0 = tracked[0]
        for t, k in cands:
            s = b.space(t, k)
            if s != s0:
                b.link(s0, s)
        out[d] = s0
    return out


def broadcast(b: Builder, node: fx.Node) -> Dims:
    """Element-wise n-ary ops with broadcasting: full-size operands are tied per dim."""
    out_shape = shape(node)
    ts = tensor_args(node)
    if out_shape is None or not ts:
        return {}
    return _tie_broadcast(b, ts, out_shape, len(out_shape), b.dims_of)


def matmul(b: Builder, node: fx.Node) -> Dims:
    """``a @ b`` with ``a: [..., n, k]``, ``b: [..., k, m]`` -> ``[..., n, m]``: the leading
    dims broadcast (attention's heads: ``q @ k^T`` and ``attn @ v`` tie the heads of q, k
    and v), ``n`` comes from ``a`` and ``m`` from ``b``, and the contracted ``k`` of ``a`` is
    tied to that of ``b`` and read there (an index removed from both removes one term of the
    sum, which the gate made 0). One-dimensional operands are not read."""
    ts = tensor_args(node)
    out_shape = shape(node)
    if len(ts) != 2 or out_shape is None or len(shape(ts[0])) < 2 or len(shape(ts[1])) < 2:
        return unknown(b, node)
    x, y = ts
    nd = len(out_shape)
    out = _tie_broadcast(b, ts, out_shape, nd - 2, b.tensor_dims)  # leading dims: as an element-wise op's
    xd, yd = b.tensor_dims(x), b.tensor_dims(y)
    nx, ny = len(shape(x)), len(shape(y))
    if nx - 2 in xd:
        out[nd - 2] = xd[nx - 2]
    if ny - 1 in yd:
        out[nd - 1] = yd[ny - 1]
    if nx - 1 in xd or ny - 2 in yd:  # the contracted dim: a gate read there makes a removed index add nothing
        sx, sy = b.space(x, nx - 1), b.space(y, ny - 2)
        if sx != sy:
            b.link(sx, sy)
        if sx not in b.batch:
            b.read(node, 0, sx, nx - 1)
    if x.op != "get_attr" and y.op != "get_attr":  # activations (attention): its FLOPs follow its channels
        spaces = set(out.values()) | ({xd[nx - 1]} if nx - 1 in xd else set())  # output dims and the contracted one
        flops = 2.0 * math.prod(out_shape) * shape(x)[-1] / b.batch_size
        b.op_flops.append((node.name, flops, tuple(sorted(s for s in spaces if s not in b.batch))))
    return out


def spatial(k: int | Callable[[fx.Node], int]) -> Rule:
    """Ops acting on the trailing ``k`` dims only (pooling, interpolation, padding)."""

    def rule(b: Builder, node: fx.Node) -> Dims:
        x = tensor_args(node)[0]
        why = f"'{node.name}' ({describe(b, node)}) acts across channel dim"
        return freeze_trailing(b, x, k(node) if callable(k) else k, lambda d: f"{why} {d}")

    return rule


def pad(b: Builder, node: fx.Node) -> Dims:
    """``F.pad(x, pad)``: ``pad`` holds a (before, after) pair per trailing dim, the last dim
    first. A dim padded by (0, 0) is untouched (Swin pads H and W of a ``[B, H, W, C]``
    tensor and passes C through); a padded channel dim is frozen."""
    x = tensor_args(node)[0]
    widths = list(arg(node, 1, "pad"))
    nd = len(shape(x))
    padded = {nd - 1 - i for i in range(len(widths) // 2) if widths[2 * i] != 0 or widths[2 * i + 1] != 0}
    return freeze_dims(b, x, padded, lambda d: f"'{node.name}' ({describe(b, node)}) pads channel dim {d}")


def roll(b: Builder, node: fx.Node) -> Dims:
    """``torch.roll(x, shifts, dims)``: the rolled dims (Swin's window shift rolls H and W)
    are frozen where they carry channels, the others pass through; without ``dims`` the
    tensor is rolled flattened."""
    x = tensor_args(node)[0]
    dims = arg(node, 2, "dims")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return unknown(b, node)
    nd = len(shape(x))
    rolled = {norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else (dims,))}
    return freeze_dims(b, x, rolled, lambda d: f"'{node.name}' rolls channel dim {d}")


def freeze_dims(b: Builder, x: fx.Node, frozen: set[int], why: Callable[[int], str]) -> Dims:
    """``x``'s channel dims, passed through; those in ``frozen`` (which the op acts
    across) are frozen with reason ``why(dim)``."""
    out = {}
    for d, s in b.dims_of(x).items():
        if d in frozen:
            b.freeze(s, why(d))
        else:
            out[d] = s
    return out


def freeze_trailing(b: Builder, x: fx.Node, k: int, why: Callable[[int], str]) -> Dims:
    """``x``'s channel dims, passed through; those among its trailing ``k`` dims (which the
    op acts across) are frozen with reason ``why(dim)``."""
    nd = len(shape(x))
    return freeze_dims(b, x, set(range(nd - k, nd)), why)


def along_dim(name: str, pos: int, what: str) -> Rule:
    """Ops that mix values along one dim (softmax): fine unless that dim carries channels."""

    return lambda b, node: mix_along(b, node, arg(node, pos, name), what)


def mix_along(b: Builder, node: fx.Node, d: int | None, what: str) -> Dims:
    x = tensor_args(node)[0]
    if d is None:
        return unknown(b, node)
    dims = dict(b.dims_of(x))
    d = norm_dim(d, len(shape(x)))
    if d in dims:
        b.freeze(dims.pop(d), f"'{node.name}' ({what}) mixes values across channels")
    return dims


def reduce(b: Builder, node: fx.Node, dim_pos: int = 1) -> Dims:
    """sum/mean/amax (``dim`` at argument ``dim_pos``, ``keepdim`` after it): channels on
    a reduced dim freeze, the others pass."""
    x = tensor_args(node)[0]
    nd = len(shape(x))
    dim = arg(node, dim_pos, "dim")
    keep = bool(arg(node, dim_pos + 1, "keepdim", False))
    if dim is None:
        reduced = set(range(nd))
    else:
        reduced = {norm_dim(d, nd) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    out = {}
    for d, s in b.dims_of(x).items():
        if d in reduced:
            b.freeze(s, f"'{node.name}' ({describe(b, node)}) reduces over channel dim {d}")
        else:
            out[d if keep else d - sum(r < d for r in reduced)] = s
    return out


def vector_norm(b: Builder, node: fx.Node) -> Dims:
    """``torch.linalg.vector_norm(x, ord, dim, keepdim)`` (``F.normalize``'s norm): a reduction."""
    return reduce(b, node, dim_pos=2)
