"""Write ``nn.MultiheadAttention`` self-attention out as the ops it computes, so the
analysis sees its heads.

``mha(x, x, x)`` becomes ``F.linear(x, in_proj_weight, in_proj_bias)``, unflattened to
``(3, heads, head_dim)``, unbound into q, k and v, ``F.scaled_dot_product_attention``,
the heads flattened back and ``F.linear`` with the output projection: what the module
computes, with the same parameters (read where they are, so names and state dicts do not
change). Only the cases where that is exactly the module's function are rewritten: query,
key and value the same tensor of 3 dims, no masks, no attention weights used, no dropout,
no bias_k/bias_v or zero attention, one embed dim for q, k and v. Others stay one call
(the analysis then keeps their channels, and says so).

Example::

    >>> from fxprune.passes.shape_prop import propagate_shapes
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
    ...     def forward(self, x):
    ...         return self.attn(x, x, x, need_weights=False)[0]
    >>> gm = fx.symbolic_trace(Block().eval())
    >>> propagate_shapes(gm, (torch.randn(2, 5, 16),))
    >>> DecomposeAttention()(gm).modified      # its self-attention, written out
    True
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["DecomposeAttention"]

_NAMES = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _call_args(node: fx.Node) -> dict:
    out = dict(zip(_NAMES, node.args))
    out.update(node.kwargs)
    return out


def _decomposable(node: fx.Node, m: nn.MultiheadAttention) -> bool:
    a = _call_args(node)
    x = a.get("query")
    tm = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    return (
        m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None and not m.add_zero_attn and m.dropout == 0.0
        and a.get("key") is x and a.get("value") is x and tm is not None and len(tm.shape) == 3
        and a.get("key_padding_mask") is None and a.get("attn_mask") is None and not a.get("is_causal", False)
        and all(u.op == "call_function" and u.target is operator.getitem and (u.args[1] == 0 or not u.users)
                for u in node.users)  # the output; the attention weights only where nothing reads them
    )


class DecomposeAttention(PassBase):
    """Rewrite every decomposable ``nn.MultiheadAttention`` call of ``gm`` (in place);
    ``decomposed`` lists the modules rewritten. Needs shapes in ``node.meta``."""

    def __init__(self) -> None:
        super().__init__()
        self.decomposed: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph, modules = gm.graph, dict(gm.named_modules())
        for node in list(graph.nodes):
            m = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(m, nn.MultiheadAttention) or not _decomposable(node, m):
                continue
            x, t, heads = _call_args(node)["query"], node.target, m.num_heads
            first = (0, 1) if m.batch_first else (1, 0)  # (batch, tokens) dims of x
            with graph.inserting_before(node):
                get = lambda name: graph.get_attr(f"{t}.{name}")  # noqa: B023 - used in this iteration
                qkv = graph.call_function(F.linear, (x, get("in_proj_weight"),
                                                     get("in_proj_bias") if m.in_proj_bias is not None else None))
                qkv = graph.call_function(torch.unflatten, (qkv, -1, (3, heads, m.head_dim)))
                qkv = graph.call_method("permute", (qkv, 2, first[0], 3, first[1], 4))  # (3, batch, heads, tokens, dim)
                parts = graph.call_method("unbind", (qkv, 0))
                q, k, v = (graph.call_function(operator.getitem, (parts, i)) for i in range(3))
                y = graph.call_function(F.scaled_dot_product_attention, (q, k, v))
                y = graph.call_method("permute", (y, 0, 2, 1, 3) if m.batch_first else (y, 2, 0, 1, 3))
                y = graph.call_method("flatten", (y, 2))
                out_bias = get("out_proj.bias") if m.out_proj.bias is not None else None
                out = graph.call_function(F.linear, (y, get("out_proj.weight"), out_bias))
            for user in list(node.users):
                if user.args[1] == 0:
                    user.replace_all_uses_with(out)
                graph.erase_node(user)
            graph.erase_node(node)
            self.decomposed.append(t)
        if self.decomposed:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(self.decomposed))
