"""Rules for layers with parameters: convolutions, linear layers and normalisations.

These are where channels are produced (output dims of weights), consumed (input dims,
where unit gates read) and carried (per-channel parameters and statistics)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import fx, nn
from torch.nn.utils import parametrizations, parametrize

from ..norms import norm_call
from ..op_classes import CONV_TRANSPOSE
from .generic import Dims, arg, freeze_trailing, shape, unknown

if TYPE_CHECKING:  # pragma: no cover
    from .builder import Builder


def conv_like(b: Builder, node: fx.Node, x: fx.Node, w: str, bias: str | None, groups: int, transposed: bool) -> Dims:
    cd = len(shape(node)) - len(b.param(w).shape) + 1
    cin_n, cout_n = shape(x)[cd], shape(node)[cd]
    cin = b.space(x, cd)
    out = b.new(node, cd, cout_n)
    dims = {d: s for d, s in b.dims_of(x).items() if d < cd}
    owner = node.target if node.op == "call_module" else node.name
    for d, s in b.dims_of(x).items():  # channels on a spatial dim (an unflatten's split): the kernel mixes them
        if d > cd and s not in b.batch:
            b.freeze(s, f"conv '{owner}' reads them on its spatial dim {d}")
    # FLOPs per weight entry and example, as FlopCounterMode counts them: two per
    # multiply-add, at every output position (input position when transposed)
    positions = math.prod(shape(x)) // cin_n if transposed else math.prod(shape(node)) // cout_n
    b.add_flops(w, 2.0 * positions / b.batch_size)
    b.layer_outputs.append((owner, out))
    if transposed:
        if groups != 1:
            b.freeze(cin, f"grouped ConvTranspose '{owner}' is not pruned")
            b.freeze(out, f"grouped ConvTranspose '{owner}' is not pruned")
            return {**dims, cd: out}
        b.bind(w, 0, cin, "consumer", owner)
        b.bind(w, 1, out, "producer", owner)
        b.read(node, 0, cin, cd)
    elif groups == 1:
        b.bind(w, 1, cin, "consumer", owner)
        b.bind(w, 0, out, "producer", owner)
        b.read(node, 0, cin, cd)
    elif groups == cin_n:  # depthwise: output channel o reads input o // m
        b.depthwise.add(owner)
        m = cout_n // cin_n
        idx = np.arange(cout_n)
        b.link(cin, out, None if m == 1 else (idx // m, idx))
        b.bind(w, 0, out, "carrier", owner)
    else:  # grouped: prune the same positions in every group, so groups stay equal
        pin, pout = cin_n // groups, cout_n // groups
        b.link(cin, cin, (np.arange(cin_n - pin), np.arange(pin, cin_n)))
        b.link(out, out, (np.arange(cout_n - pout), np.arange(pout, cout_n)))
        b.bind(w, 1, cin, "consumer", owner, period=pin)
        b.bind(w, 0, out, "producer", owner)
        b.read(node, 0, cin, cd)
    if bias is not None:
        b.bind(bias, 0, out, "carrier" if groups == cin_n and groups > 1 else "producer", owner)
    return {**dims, cd: out}


def _tensor(b: Builder, m: nn.Module, path: str, attr: str) -> tuple[str | None, list[str], str | None, str | None]:
    """How layer ``path``'s ``attr`` ("weight" or "bias") is held: ``(tensor to bind in its
    place, tensors indexed by its output channels too, reason to keep the input channels,
    reason to keep the output channels)``. A plain tensor binds as itself. A parametrized
    one (``torch.nn.utils.parametrize``) binds through its original: ``weight_norm`` over
    output channels (``dim=0``) keeps the output channels prunable, since each filter is
    normalised on its own, but not the input channels, which every filter's norm sums
    over; any other parametrization keeps both."""
    if getattr(m, attr, None) is None:
        return None, [], None, None
    if not parametrize.is_parametrized(m, attr):
        return f"{path}.{attr}", [], None, None
    plist = m.parametrizations[attr]
    kinds = ", ".join(type(p).__name__.lstrip("_") for p in plist)
    base = f"{path}.parametrizations.{attr}"
    names = [f"{base}.{n}" for n, _ in plist.named_parameters(recurse=False) if n.startswith("original")]
    if len(plist) == 1 and _WEIGHT_NORM is not None and isinstance(plist[0], _WEIGHT_NORM) \
            and getattr(plist[0], "dim", None) == 0 \
            and not isinstance(m, CONV_TRANSPOSE) and len(names) == 2 and attr == "weight":
        g, v = f"{base}.original0", f"{base}.original1"
        return v, [g], f"'{path}' has weight_norm: every filter is normalised over its input channels", None
    why = f"'{path}'.{attr} is computed by a parametrization ({kinds}), which fxprune cannot slice"
    same = [n for n in names if tuple(b.param(n).shape) == tuple(getattr(m, attr).shape)]
    return (same[0] if same else None), [], why, why


#: the parametrization ``torch.nn.utils.parametrizations.weight_norm`` registers (private in torch: a torch
#: without it has every parametrization frozen, as an unknown one is)
_WEIGHT_NORM: type | None = getattr(parametrizations, "_WeightNorm", None)


def conv_module(b: Builder, node: fx.Node) -> Dims:
    m = b.modules[node.target]
    w, extra, keep_in, keep_out = _tensor(b, m, node.target, "weight")
    bias, _, _, bias_frozen = _tensor(b, m, node.target, "bias")
    if w is None:
        return unknown(b, node, keep_in)
    transposed = isinstance(m, CONV_TRANSPOSE)
    dims = conv_like(b, node, node.args[0], w, bias, m.groups, transposed)
    cd = len(shape(node)) - len(b.param(w).shape) + 1
    _parametrized(b, node.target, b.space(node.args[0], cd), dims[cd], extra, keep_in, keep_out or bias_frozen)
    return dims


def _parametrized(b: Builder, owner: str, cin: int, out: int, extra: list[str], keep_in: str | None,
                  keep_out: str | None) -> None:
    for name in extra:
        b.bind(name, 0, out, "producer", owner)
    if keep_in:
        b.freeze(cin, keep_in)
    if keep_out:
        b.freeze(out, keep_out)


def _attr(x: Any) -> str | None:
    return str(x.target) if isinstance(x, fx.Node) and x.op == "get_attr" else None


def conv_function(b: Builder, node: fx.Node) -> Dims:
    w, bias, groups = arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 6, "groups", 1)
    if _attr(w) is None or (bias is not None and _attr(bias) is None) or groups != 1:
        return unknown(b, node, f"functional conv '{node.name}' with computed weights or groups>1 is not pruned")
    return conv_like(b, node, node.args[0], _attr(w), _attr(bias), 1, False)


def linear_like(b: Builder, node: fx.Node, x: fx.Node, w: str, bias: str | None, transposed: bool = False) -> Dims:
    """``y = x w^T + bias`` (``w`` is ``[out, in]``; ``transposed``: ``[in, out]``, ``x w + bias``)."""
    nd = len(shape(node))
    owner = node.target if node.op == "call_module" else node.name
    cin = b.space(x, nd - 1)
    out = b.new(node, nd - 1, shape(node)[-1])
    b.add_flops(w, 2.0 * math.prod(shape(node)[:-1]) / b.batch_size)
    b.layer_outputs.append((owner, out))
    b.bind(w, 0 if transposed else 1, cin, "consumer", owner)
    b.bind(w, 1 if transposed else 0, out, "producer", owner)
    if bias is not None:
        b.bind(bias, 0, out, "producer", owner)
    b.read(node, node.args.index(x), cin, nd - 1)
    return {**{d: s for d, s in b.dims_of(x).items() if d < nd - 1}, nd - 1: out}


def linear_module(b: Builder, node: fx.Node) -> Dims:
    m = b.modules[node.target]
    w, extra, keep_in, keep_out = _tensor(b, m, node.target, "weight")
    bias, _, _, bias_frozen = _tensor(b, m, node.target, "bias")
    if w is None:
        return unknown(b, node, keep_in)
    dims = linear_like(b, node, node.args[0], w, bias)
    nd = len(shape(node))
    _parametrized(b, node.target, b.space(node.args[0], nd - 1), dims[nd - 1], extra, keep_in, keep_out or bias_frozen)
    return dims


def embedding(b: Builder, node: fx.Node) -> Dims:
    """``nn.Embedding`` / ``F.embedding``: the indices' dims pass through (the batch),
    and the rows' last dim is produced by the weight's dim 1 (prunable like a linear
    layer's outputs, unless ``max_norm`` renormalises the rows)."""
    if node.op == "call_module":
        m = b.modules[node.target]
        w, _, _, frozen = _tensor(b, m, node.target, "weight")
        max_norm, owner = m.max_norm, node.target
    else:
        w, max_norm, frozen = _attr(arg(node, 1, "weight")), arg(node, 3, "max_norm"), None
        owner = node.name
    if w is None:
        return unknown(b, node, f"embedding '{owner}' with computed weights is not pruned")
    idx = node.args[0] if node.args else node.kwargs["input"]
    nd = len(shape(node))
    out = b.new(node, nd - 1, shape(node)[-1])
    b.bind(w, 1, out, "producer", owner)
    if max_norm is not None:
        b.freeze(out, f"embedding '{owner}' renormalises its rows (max_norm): pruning would change their norms")
    if frozen:
        b.freeze(out, frozen)
    return {**{d: s for d, s in b.dims_of(idx).items() if d < nd - 1}, nd - 1: out}


def linear_function(b: Builder, node: fx.Node) -> Dims:
    """``F.linear(x, w, bias)`` with ``w`` a parameter; ``bias`` a parameter, or computed
    from one channel by channel (Swin V2 zeroes the k part of a copy of its q/k/v bias): its
    channels are then tied to the output's, untracked ones freeze them."""
    w, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
    if _attr(w) is None or (isinstance(bias, fx.Node) and shape(bias) is None):
        return unknown(b, node, f"functional linear '{node.name}' with computed weights is not pruned")
    dims = linear_like(b, node, node.args[0], _attr(w), _attr(bias))
    if isinstance(bias, fx.Node) and _attr(bias) is None:
        nd = len(shape(node))
        s = b.tensor_dims(bias).get(0)
        s = b.space(bias, 0) if s is None or s in b.batch else s
        b.link(dims[nd - 1], s)
    return dims


def addmm_function(b: Builder, node: fx.Node) -> Dims:
    """``torch.addmm(bias, x, w)`` with ``w`` (``[in, out]``) and ``bias`` parameters and
    ``beta = alpha = 1``: a linear layer that holds its weight transposed (transformers'
    ``Conv1D``, GPT-2's projections)."""
    bias, x, w = (arg(node, i, k) for i, k in ((0, "input"), (1, "mat1"), (2, "mat2")))
    if _attr(w) is None or _attr(bias) is None or arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
        return unknown(b, node, f"addmm '{node.name}' of computed tensors is not pruned")
    return linear_like(b, node, x, _attr(w), _attr(bias), transposed=True)


def channel_norm(b: Builder, node: fx.Node, names: list[str | None]) -> Dims:
    """Per-channel normalisation (BatchNorm, InstanceNorm): carriers on dim 1."""
    x = node.args[0] if node.args else node.kwargs["input"]
    dims = dict(b.dims_of(x))
    if len(shape(x)) < 2:
        return unknown(b, node)
    s = b.space(x, 1)
    for n in names:
        if n is not None:
            b.bind(n, 0, s, "carrier", node.target if node.op == "call_module" else node.name)
    dims[1] = s
    return dims


def norm_module(b: Builder, node: fx.Node) -> Dims:
    m = b.modules[node.target]
    names = [f"{node.target}.{p}" for p in ("weight", "bias", "running_mean", "running_var") if getattr(m, p, None) is not None]
    return channel_norm(b, node, names)


def batch_norm_function(b: Builder, node: fx.Node) -> Dims:
    tensors = [arg(node, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    if any(t is not None and _attr(t) is None for t in tensors):
        return unknown(b, node, f"functional batch_norm '{node.name}' with computed statistics is not pruned")
    return channel_norm(b, node, [_attr(t) for t in tensors])


def trailing_norm(b: Builder, node: fx.Node) -> Dims:
    """LayerNorm / RMSNorm (module or function) over the last dim: a ``"norm"`` read of
    its channels (the gated model's norm counts only the channels whose gate is on, the
    compact model's normalises the kept width), the affine tensors carried, the
    normalised shape rewritten. Over several trailing dims, or with computed affine
    tensors, the channels it normalises are frozen."""
    nc = norm_call(node, b.modules)
    what = "LayerNorm" if nc.kind == "layer" else "RMSNorm"
    x, tensors = nc.x, [t for t in (nc.weight, nc.bias) if t is not None]
    names = [t if isinstance(t, str) else _attr(t) for t in tensors]
    nd = len(shape(x))
    if nc.ndims != 1:
        return _norm_over(b, node, x, nc.ndims, f"{what} normalises over {nc.ndims} dims")
    if None in names:
        return _norm_over(b, node, x, 1, f"{what} with computed affine tensors")
    if not node.args or node.args[0] is not x or b.dims_of(x).get(nd - 1) in b.batch:
        return _norm_over(b, node, x, 1, f"{what} of a tensor passed by keyword or over the batch")
    s = b.space(x, nd - 1)
    owner = node.target if node.op == "call_module" else node.name
    for name in names:
        b.bind(name, 0, s, "carrier", owner)
    b.read(node, 0, s, nd - 1, kind="norm")
    b.rewrite(node, "norm", 1, (s,))  # the normalised shape follows the kept channels, wherever it was read
    return {**b.dims_of(x), nd - 1: s}


def _norm_over(b: Builder, node: fx.Node, x: fx.Node, k: int, why: str) -> Dims:
    return freeze_trailing(b, x, k, lambda d: f"{why} ('{node.name}'); pruning would change its statistics")


def group_norm(b: Builder, node: fx.Node) -> Dims:
    """GroupNorm over dim 1 in ``groups`` groups: a ``"norm"`` read whose statistics (per
    group) count only the channels whose gate is on. The same position is pruned in every
    group (a unit is one position, in all groups), so the groups stay equal and the compact
    model's plain GroupNorm, with the same number of groups, groups the kept channels as
    the gated model did."""
    nc = norm_call(node, b.modules)
    x = nc.x
    names = [t if isinstance(t, str) else _attr(t) for t in (nc.weight, nc.bias) if t is not None]
    why = "GroupNorm normalises over groups of channels"
    nd, groups = len(shape(x)), nc.groups
    if nd < 2 or not isinstance(groups, int) or None in names or not node.args or node.args[0] is not x \
            or b.batch_dim(x) not in (0, None) or b.dims_of(x).get(1) in b.batch:
        return _norm_over(b, node, x, nd - 1, f"{why} (with computed affine tensors, a computed group count or the "
                                              "batch elsewhere than dim 0)")
    c = shape(x)[1]
    s = b.space(x, 1)
    per = c // groups
    if groups > 1:  # position j of every group is one unit
        b.link(s, s, (np.arange(c - per), np.arange(per, c)))
    owner = node.target if node.op == "call_module" else node.name
    for name in names:
        b.bind(name, 0, s, "carrier", owner)
    b.read(node, 0, s, 1, kind="norm")
    dims = {d: sp for d, sp in b.dims_of(x).items() if d < 2}
    for d, sp in b.dims_of(x).items():
        if d >= 2:  # statistics are taken over the spatial dims too
            b.freeze(sp, f"{why} ('{node.name}') and over dim {d}")
    dims[1] = s
    return dims
