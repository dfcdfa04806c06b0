"""Rules for attention: ``F.scaled_dot_product_attention`` over heads.

Attention is computed per head: the leading dims of q, k and v (batch, heads) index the
same examples and heads, so a head's channels in q, k and v are tied and a whole head can
be removed. With grouped-query attention (``enable_gqa=True``, or k and v repeated with
``repeat_interleave`` along the heads) each k/v head is one unit with the q heads that
share it, so the groups stay equal. The query-key dot product sums over q's and k's last dim (head_dim: frozen
there), the key tokens are mixed, and v's last dim passes to the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch import fx

from .generic import Dims, arg, shape, unknown

if TYPE_CHECKING:  # pragma: no cover
    from .builder import Builder


def sdpa(b: Builder, node: fx.Node) -> Dims:
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    mask = arg(node, 3, "attn_mask")
    what = f"'{node.name}' (scaled_dot_product_attention)"
    if not all(isinstance(t, fx.Node) and shape(t) is not None for t in (q, k, v)):
        return unknown(b, node)
    nd = len(shape(q))
    if len(shape(k)) != nd or len(shape(v)) != nd:
        return unknown(b, node, f"{what} with broadcast q/k/v is not pruned")
    gqa = bool(arg(node, 7, "enable_gqa", False))
    dq, dk, dv = b.dims_of(q), b.dims_of(k), b.dims_of(v)
    out: Dims = {}
    for d in range(nd - 2):  # batch and heads: the same in q, k and v
        spaces = [x.get(d) for x in (dq, dk, dv)]
        tracked = [s for s in spaces if s is not None]
        if not tracked:
            continue
        if any(s in b.batch for s in tracked):
            out[d] = spaces[0] if spaces[0] is not None else tracked[0]
            continue
        sizes = [b.spaces[s].size for s in tracked]
        grouped = gqa and d == nd - 3 and len(tracked) == 3 and sizes[1] == sizes[2] and sizes[0] % sizes[1] == 0
        if len(tracked) < 3 or (len(set(sizes)) > 1 and not grouped):
            for s in tracked:
                b.freeze(s, f"{what} attends along dim {d}, which carries channels in only some of q, k and v")
            continue
        if grouped and sizes[0] != sizes[1]:  # grouped-query: q head h reads k/v head h // (q heads / k/v heads)
            h = np.arange(sizes[0])
            b.link(spaces[0], spaces[1], (h, h // (sizes[0] // sizes[1])))
            if spaces[2] != spaces[1]:
                b.link(spaces[1], spaces[2])
        else:
            for s in spaces[1:]:
                if s != spaces[0]:
                    b.link(spaces[0], s)
        out[d] = spaces[0]
    if nd - 2 in dq:
        out[nd - 2] = dq[nd - 2]
    for x in (dk, dv):
        s = x.get(nd - 2)
        if s is not None and s not in b.batch:
            b.freeze(s, f"{what} mixes values across the key tokens")
    if nd - 1 in dq or nd - 1 in dk:  # the query-key dot product sums over q's and k's head_dim: tied, read
        sq, sk = b.space(q, nd - 1), b.space(k, nd - 1)
        if sq != sk:
            b.link(sq, sk)
        if sq not in b.batch:
            b.read(node, 0, sq, nd - 1)
            if arg(node, 6, "scale") is None:  # the default scale is 1/sqrt(head_dim): it must stay the dense one's
                b.rewrite(node, "scale", shape(q)[-1], (sq,))
    if nd - 1 in dv:
        out[nd - 1] = dv[nd - 1]
    if isinstance(mask, fx.Node) and shape(mask) is not None:
        # the mask (a relative position bias) broadcasts against the scores [..., heads, L, S]: where it has
        # a dim of its own over the heads, that dim must keep the same heads (or the heads stay whole)
        lead, mdims = nd - len(shape(mask)), b.dims_of(mask)
        for md, size in enumerate(shape(mask)):
            d = md + lead
            s = out.get(d)
            if d < nd - 2 and size > 1 and s is not None and s not in b.batch:
                ms = b.space(mask, md)
                if b.spaces[ms].size == b.spaces[s].size and ms not in b.batch:
                    b.link(s, ms)
                else:
                    b.freeze(s, f"{what} adds a mask whose dim {md} does not follow the heads")
            elif d >= nd - 2 and mdims.get(md) is not None and mdims[md] not in b.batch:
                b.freeze(mdims[md], f"{what} adds a mask with channels to the attention scores")
    return out
