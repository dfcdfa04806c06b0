"""Recognise RMSNorm written out by hand, so the analysis reads it as a norm.

Language models (Llama, Mistral, Qwen, T5 and their kin in transformers) write RMSNorm
as ops: ``h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)``. Read op by op, the
mean reduces over the channels and freezes the whole residual stream. This pass rewrites
that core as ``F.rms_norm(h, (C,), None, eps)``, which computes the same thing; the
casts and the weight multiplication around it stay as they are (the weight is read as a
carrier of the channels). The norm machinery then takes over: masked statistics in the
gated model, the plain call over the kept width in the compact one.

Matched: ``pow(h, 2)`` or ``h * h``, then ``mean`` over the last dim only with
``keepdim=True``, ``+ eps`` (a number), ``rsqrt``, and a multiplication by the same
``h``; every intermediate read by nothing else. Function, method and operator spellings
are all matched. Needs shapes in ``node.meta``.

Example::

    >>> from fxprune.passes.shape_prop import propagate_shapes
    >>> def rms(h):                          # as Llama writes it
    ...     return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    >>> gm = fx.symbolic_trace(rms)
    >>> propagate_shapes(gm, (torch.randn(2, 8),))
    >>> RecognizeRMSNorm()(gm).modified
    True
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["RecognizeRMSNorm"]

_POW = {torch.pow, operator.pow, "pow"}
_MUL = {torch.mul, operator.mul, "mul"}
_ADD = {torch.add, operator.add, "add"}
_MEAN = {torch.mean, "mean"}
_RSQRT = {torch.rsqrt, "rsqrt"}


def _is(node: Any, ops: set) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in ops


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _squared(node: fx.Node) -> fx.Node | None:
    """``h`` when ``node`` is ``h ** 2`` or ``h * h``."""
    if _is(node, _POW) and len(node.args) == 2 and node.args[1] == 2 and not node.kwargs:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if _is(node, _MUL) and len(node.args) == 2 and node.args[0] is node.args[1] and not node.kwargs:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    return None


def _last_dim_mean(node: fx.Node, nd: int) -> bool:
    args = list(node.args[1:]) + [None] * 2
    dim = node.kwargs.get("dim", args[0])
    keep = node.kwargs.get("keepdim", args[1])
    dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
    return keep is True and len(dims) == 1 and isinstance(dims[0], int) and dims[0] % nd == nd - 1


def _match(mean: fx.Node) -> tuple[fx.Node, list[fx.Node], float] | None:
    """``(h, the norm's nodes from the square to the multiplication, eps)`` when ``mean``
    is the mean of one."""
    if not _is(mean, _MEAN) or not mean.args:
        return None
    sq = mean.args[0]
    if not isinstance(sq, fx.Node) or len(sq.users) != 1:
        return None
    h = _squared(sq)
    tm = h.meta.get("tensor_meta") if h is not None else None
    if h is None or tm is None or not hasattr(tm, "shape") or not len(tm.shape) or not _last_dim_mean(mean, len(tm.shape)):
        return None
    add = _only_user(mean)
    if add is None or not _is(add, _ADD) or add.kwargs or len(add.args) != 2:
        return None
    eps = add.args[1] if add.args[0] is mean else add.args[0]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    root = _only_user(add)
    if root is None or not _is(root, _RSQRT):
        return None
    mul = _only_user(root)
    if mul is None or not _is(mul, _MUL) or mul.kwargs or set(mul.args) != {h, root} or len(mul.args) != 2:
        return None
    return h, [sq, mean, add, root, mul], float(eps)


class RecognizeRMSNorm(PassBase):
    """Rewrite every hand-written RMSNorm core of ``gm`` (in place) as ``F.rms_norm``;
    ``recognised`` names the multiplications replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.recognised: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        for node in list(graph.nodes):
            found = _match(node)
            if found is None:
                continue
            h, nodes, eps = found
            mul = nodes[-1]
            width = int(h.meta["tensor_meta"].shape[-1])
            with graph.inserting_before(mul):
                norm = graph.call_function(F.rms_norm, (h, (width,), None, eps))
            norm.meta.update({k: v for k, v in mul.meta.items() if k in ("tensor_meta", "type")})
            self.recognised.append(mul.name)
            mul.replace_all_uses_with(norm)
            for dead in reversed(nodes):  # each was read only by the next
                graph.erase_node(dead)
        if self.recognised:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(self.recognised))
