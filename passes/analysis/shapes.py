"""Rules for ops that move channels between tensor dims: reshape, permute, expand,
indexing, cat, split/chunk, and reads of a tensor's size."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx

from ..channel_graph import Rewrite
from ..sizes import sizes_of
from .builder import ShapeOf, SizeRead
from .generic import Dims, arg, describe, is_tensor, norm_dim, shape, tensor_args, unknown

if TYPE_CHECKING:  # pragma: no cover
    from .builder import Builder


def _blocks(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair the non-1 dims of a reshape into blocks with equal products."""
    a = [i for i, n in enumerate(ins) if n != 1]
    c = [i for i, n in enumerate(outs) if n != 1]
    blocks, i, j = [], 0, 0
    while i < len(a) and j < len(c):
        bi, bo, pi, po = [a[i]], [c[j]], ins[a[i]], outs[c[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                bi.append(a[i])
                pi, i = pi * ins[a[i]], i + 1
            else:
                bo.append(c[j])
                po, j = po * outs[c[j]], j + 1
        blocks.append((bi, bo))
    return blocks


def _batch_position(ins: tuple[int, ...], outs: tuple[int, ...], d: int) -> int | None:
    """Where dim ``d`` of a reshape's input lands in its output, if it lands whole: the
    output dim of the same size with the same number of elements before it."""
    before = math.prod(ins[:d])
    for o, n in enumerate(outs):
        if n == ins[d] and math.prod(outs[:o]) == before:
            return o
    return None


def reshape(b: Builder, node: fx.Node) -> Dims:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze, from the recorded shapes.

    Dims merged into one channel dim, one of them carrying channels, tie each merged
    channel to its source channel. One channel dim split into several (``[B, N, 3 * H * D]
    -> [B, N, 3, H, D]``) carries its channels on its two innermost dims (H and D): the
    channel dim is recorded as their product (a head is a block of channels, its q, k and
    v rows; a head_dim entry is that entry of every head), the other dims keep their sizes.
    Two channel dims merged back into one (``[B, N, H, D] -> [B, N, H * D]``) make their
    product again. Products are resolved once the groups are known
    (:func:`.groups.resolve_products`), falling back to the heads alone."""
    x = tensor_args(node)[0]
    ins, outs = shape(x), shape(node)
    dims = b.tensor_dims(x)
    out: Dims = {}
    for d, s in dims.items():
        if s in b.batch and (o := _batch_position(ins, outs, d)) is not None:
            out[o] = s
    channels = {d: s for d, s in dims.items() if s not in b.batch}
    for bi, bo in _blocks(ins, outs):
        tracked = [d for d in bi if d in channels]
        if not tracked:
            continue
        if (len(bo) > 1 and len(bi) > 1) or len(tracked) > 2:
            for d in tracked:
                b.freeze(channels[d], f"'{node.name}' ({describe(b, node)}) splits or interleaves channel dim {d}")
            continue
        if len(tracked) == 2:  # two channel dims merged into one (heads, head_dim -> width): their product
            o = bo[0]
            out[o] = b.new(node, o, outs[o])
            idx = np.arange(outs[o])
            b.factor(node, out[o], [channels[t] for t in tracked],
                     [(idx // math.prod(ins[k] for k in bi if k > t)) % ins[t] for t in tracked])
            continue
        d, o = tracked[0], bo[0]
        if len(bo) > 1:  # one channel dim split into several: (..., heads, head_dim), (..., 3, heads, head_dim)
            # the dim just outside the innermost (heads) and the innermost (head_dim) carry the channels, as a
            # product; the others keep their sizes (a head's q, k and v rows are one head)
            o, i = bo[-2], bo[-1]
            idx = np.arange(ins[d])
            out[o], out[i] = b.new(node, o, outs[o]), b.new(node, i, outs[i])
            b.inner.add(out[i])
            b.factor(node, channels[d], [out[o], out[i]], [(idx // outs[i]) % outs[o], idx % outs[i]])
        elif len(bi) == 1:
            out[o] = channels[d]
        else:
            inner = math.prod(ins[k] for k in bi if k > d)
            idx = np.arange(outs[o])
            out[o] = b.new(node, o, outs[o])
            b.link(channels[d], out[o], ((idx // inner) % ins[d], idx))
    check_sizes(b, node, out)
    return out


def check_sizes(b: Builder, node: fx.Node, out: Dims) -> None:
    """The sizes a view/reshape/expand/unflatten is given, against the channel spaces of
    its output ``out``: a literal channel count becomes a rewrite; a size read from a
    tensor must be the size of the same channels (checked once groups are known); any
    other size of a channel dim (computed, or the channel count of a dim without
    channels) freezes it."""
    sizes = sizes_of(node, b.modules)
    if sizes is None:
        return
    values = sizes.values
    if len(values) == 1 and isinstance(b.dims.get(getattr(values[0], "name", None)), ShapeOf):
        src = b.dims[values[0].name].tensor  # y.view(x.shape): every dim takes x's size
        for o, s in out.items():
            t = b.dims_of(src).get(o)
            if s in b.batch:
                continue
            if t is None or t in b.batch:
                b.freeze(s, f"'{node.name}' gives channel dim {o} the size of '{src.name}' dim {o}, which carries no channels")
            else:
                b.ties.append((t, s, node.name, None))
        return
    for k, v in enumerate(values):
        o = sizes.first_dim + k
        space = out.get(o)
        if space in b.batch:
            continue
        info = b.size_info(v)
        if isinstance(v, int):
            if space is not None and v != -1:
                b.rewrite(node, "sizes", k, (space,))
        elif info is not None:
            has_channels = info.space is not None and info.space not in b.batch
            if space is not None and has_channels:
                b.ties.append((info.space, space, node.name, Rewrite(node.name, "sizes", k, (space,))))
            elif space is not None:
                b.freeze(space, f"'{node.name}' gives channel dim {o} the size of dim {info.dim} of '{info.tensor}', "
                                "which carries no channels")
            elif has_channels:
                b.freeze(info.space, f"'{node.name}' uses the channel count of '{info.tensor}' (dim {info.dim}) as the "
                                     f"size of its dim {o}, which carries no channels")
        elif space is not None:
            b.freeze(space, f"'{node.name}' gives channel dim {o} a computed size ('{getattr(v, 'name', v)}')")


def permute(b: Builder, node: fx.Node) -> Dims:
    x = tensor_args(node)[0]
    nd = len(shape(x))
    if node.target in ("transpose", torch.transpose):
        d0, d1 = norm_dim(arg(node, 1, "dim0"), nd), norm_dim(arg(node, 2, "dim1"), nd)
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        p = node.args[1:] if node.op == "call_method" else arg(node, 1, "dims")
        if len(p) == 1 and isinstance(p[0], (tuple, list)):
            p = p[0]
        if not all(isinstance(v, int) for v in p):
            return unknown(b, node)
        perm = [norm_dim(v, nd) for v in p]
    return {perm.index(d): s for d, s in b.dims_of(x).items()}


def expand(b: Builder, node: fx.Node) -> Dims:
    x = tensor_args(node)[0]
    lead = len(shape(node)) - len(shape(x))
    out = {}
    for d, s in b.tensor_dims(x).items():
        if shape(x)[d] == shape(node)[d + lead]:
            out[d + lead] = s
        else:
            b.freeze(s, f"'{node.name}' expands channel dim {d}")
    check_sizes(b, node, out)
    return out


def expand_as(b: Builder, node: fx.Node) -> Dims:
    """``x.expand_as(other)``: a dim of ``x`` at full size keeps its channels (tied to
    ``other``'s there); a dim ``x`` broadcasts has ``other``'s size, so it carries
    ``other``'s channels (every index the same value)."""
    x, other = tensor_args(node)[:2]
    nd = len(shape(node))
    lead = nd - len(shape(x))
    xd, od = b.tensor_dims(x), b.dims_of(other)
    out = {}
    for d in range(nd):
        k = d - lead
        if k >= 0 and k in xd and shape(x)[k] == shape(node)[d]:
            out[d] = xd[k]
            if d in od and od[d] != xd[k]:
                b.link(xd[k], od[d])
        elif d in od:
            out[d] = od[d]
    return out


def _integer(t: fx.Node) -> bool:
    dtype = t.meta["tensor_meta"].dtype
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def getitem(b: Builder, node: fx.Node) -> Dims | SizeRead | list[Dims]:
    x, idx = node.args[0], node.args[1]
    xd = b.dims.get(x.name) if isinstance(x, fx.Node) else None
    if isinstance(xd, list):
        return xd[idx] if isinstance(idx, int) else unknown(b, node)
    if isinstance(xd, ShapeOf):
        return b.size_read(node, xd.tensor, idx)
    if not is_tensor(x):
        return {}
    dims, xs = b.tensor_dims(x), shape(x)  # a table read directly (get_attr) carries its channels
    items = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    n_tensor_items = sum(1 for it in items if is_tensor(it))
    if any(is_tensor(it) and it.meta.get("tensor_meta") is not None and not _integer(it) for it in items):
        return unknown(b, node)  # a boolean mask: how many entries it keeps depends on the values
    out, d_in, d_out = {}, 0, 0
    for k, it in enumerate(items):
        if it is Ellipsis:
            for _ in range(len(xs) - n_real):
                if d_in in dims:
                    out[d_out] = dims[d_in]
                d_in, d_out = d_in + 1, d_out + 1
        elif it is None:
            d_out += 1
        elif isinstance(it, int):
            if d_in in dims:
                b.freeze(dims[d_in], f"'{node.name}' selects a single channel of dim {d_in}")
            d_in += 1
        elif isinstance(it, slice) and d_in not in dims:  # a dim without channels: any bounds
            d_in, d_out = d_in + 1, d_out + 1
        elif isinstance(it, slice) and all(isinstance(v, (int, type(None))) for v in (it.start, it.stop, it.step)):
            if d_in in dims:
                start, stop, step = it.indices(xs[d_in])
                if step != 1:
                    b.freeze(dims[d_in], f"'{node.name}' takes a strided slice of channel dim {d_in}")
                elif (start, stop) == (0, xs[d_in]):
                    out[d_out] = dims[d_in]
                else:
                    n = max(stop - start, 0)
                    out[d_out] = b.new(node, d_out, n)
                    b.link(dims[d_in], out[d_out], (start + np.arange(n), np.arange(n)))
                    b.rewrite(node, "slice", k, (dims[d_in],))
            d_in, d_out = d_in + 1, d_out + 1
        elif is_tensor(it) and not n_tensor_items > 1 and shape(it) is not None:
            # one integer tensor index: dim d_in is replaced, in place, by the index's dims
            if d_in in dims:
                b.freeze(dims[d_in], f"'{node.name}' gathers along channel dim {d_in} with a tensor index")
            d_in, d_out = d_in + 1, d_out + len(shape(it))
        else:
            return unknown(b, node)
    for d in range(d_in, len(xs)):
        if d in dims:
            out[d_out + d - d_in] = dims[d]
    return out


def cat(b: Builder, node: fx.Node) -> Dims:
    nd = len(shape(node))
    # torch.cat skips an empty 1-D tensor whatever the other shapes (an empty KV cache)
    ts = [t for t in arg(node, 0, "tensors") if is_tensor(t) and (nd == 1 or tuple(shape(t)) != (0,))]
    cd = norm_dim(arg(node, 1, "dim", 0), nd)
    out: Dims = {}
    dims = [b.dims_of(t) for t in ts]
    for d in sorted({d for ds in dims for d in ds}):
        tracked = [ds[d] for ds in dims if d in ds]
        if d != cd:
            for t, ds in zip(ts, dims):
                if ds.get(d) != tracked[0]:
                    b.link(tracked[0], b.space(t, d))
            out[d] = tracked[0]
            continue
        out[d] = b.new(node, d, shape(node)[d])
        off = 0
        for t in ts:
            n = shape(t)[d]
            idx = np.arange(n)
            b.link(b.space(t, d), out[d], (idx, off + idx))
            off += n
    return out


def split(b: Builder, node: fx.Node) -> list[Dims]:
    x = tensor_args(node)[0]
    nd = len(shape(x))
    d = norm_dim(arg(node, 2, "dim", 0), nd)
    metas = node.meta["tensor_meta"]
    dims = b.dims_of(x)
    outs: list[Dims] = [dict(dims) for _ in metas]
    if d in dims:
        off, spaces = 0, []
        for k, m in enumerate(metas):
            n = m.shape[d]
            outs[k][d] = b.new(node, d, n)
            b.link(dims[d], outs[k][d], (off + np.arange(n), np.arange(n)))
            spaces.append(outs[k][d])
            off += n
        b.rewrite(node, "split", d, tuple(spaces))
    return outs


def size(b: Builder, node: fx.Node) -> Any:
    """``x.size(d)`` is a size read; ``x.size()`` and ``x.shape`` are read by index later."""
    x = node.args[0]
    d = arg(node, 1, "dim")
    if node.op == "call_method" and d is not None:
        return b.size_read(node, x, d)
    return ShapeOf(x)


def unbind(b: Builder, node: fx.Node) -> list[Dims]:
    """``x.unbind(dim)``: one tensor per index of ``dim``, which must carry no channels."""
    x = tensor_args(node)[0]
    nd = len(shape(x))
    dim = norm_dim(arg(node, 1, "dim", 0), nd)
    dims = b.dims_of(x)
    if dim in dims and dims[dim] not in b.batch:
        b.freeze(dims[dim], f"'{node.name}' unbinds channel dim {dim}")
    one = {d - (d > dim): s for d, s in dims.items() if d != dim}
    return [dict(one) for _ in range(shape(x)[dim])]


def repeat_interleave(b: Builder, node: fx.Node) -> Dims:
    """``x.repeat_interleave(r, dim)`` with an int ``r`` (grouped-query attention's k/v heads
    repeated for the q heads): output index i of ``dim`` is input index i // r."""
    x = tensor_args(node)[0]
    reps, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    dims = dict(b.dims_of(x))
    if not isinstance(reps, int) or not isinstance(dim, int):
        return unknown(b, node, f"'{node.name}' repeats by a tensor or over the flattened input")
    dim = norm_dim(dim, len(shape(x)))
    s = dims.get(dim)
    if s is not None and s not in b.batch:
        idx = np.arange(shape(node)[dim])
        dims[dim] = b.new(node, dim, shape(node)[dim])
        b.link(s, dims[dim], (idx // reps, idx))
    elif s is not None:
        b.freeze(s, f"'{node.name}' repeats the batch")
        dims.pop(dim)
    return dims
