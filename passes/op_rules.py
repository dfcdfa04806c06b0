"""What each op does to channel spaces: the rule table of the dependency analysis.

A rule gets the analysis builder and one fx node, records what the op ties, produces,
consumes or carries, and returns the channel dims of the node's output (``{dim: space}``,
or a list of those for ops that return several tensors). Any op without a rule freezes
every channel it touches: it is never assumed to be channel-preserving.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

if TYPE_CHECKING:  # pragma: no cover
    from .analyze import Builder

__all__ = ["rule_for", "Dims"]

Dims = dict[int, int]
Rule = Callable[["Builder", fx.Node], Any]


# ----------------------------------------------------------------------------- helpers
def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def shape(x: Any) -> tuple[int, ...] | None:
    tm = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def is_tensor(x: Any) -> bool:
    return shape(x) is not None


def tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if is_tensor(a) else None)
    return out


def describe(b: "Builder", node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(b.modules[node.target]).__name__} module '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", str(node.target))


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# ----------------------------------------------------------------------------- generic rules
def unknown(b: "Builder", node: fx.Node, why: str | None = None) -> Dims:
    why = why or f"read by '{node.name}' ({describe(b, node)}), an op the analysis does not understand"
    for t in tensor_args(node):
        for s in b.dims_of(t).values():
            b.freeze(s, why)
    return {}


def passthrough(b: "Builder", node: fx.Node) -> Dims:
    """Element-wise unary ops: output channels are the input's."""
    x = tensor_args(node)
    return dict(b.dims_of(x[0])) if x else {}


def no_tensor(b: "Builder", node: fx.Node) -> Dims:
    return {}


def broadcast(b: "Builder", node: fx.Node) -> Dims:
    """Element-wise n-ary ops with broadcasting: full-size operands are tied per dim."""
    out_shape = shape(node)
    ts = tensor_args(node)
    if out_shape is None or not ts:
        return {}
    nd, out = len(out_shape), {}
    for d in range(nd):
        cands = []
        for t in ts:
            k = d - (nd - len(shape(t)))
            if k >= 0 and not (shape(t)[k] == 1 and out_shape[d] != 1):
                cands.append((t, k))
        tracked = [b.dims_of(t)[k] for t, k in cands if k in b.dims_of(t)]
        if not tracked:
            continue
        s0 = tracked[0]
        for t, k in cands:
            s = b.space(t, k)
            if s != s0:
                b.link(s0, s)
        out[d] = s0
    return out


def spatial(k: int | Callable[[fx.Node], int]) -> Rule:
    """Ops acting on the trailing ``k`` dims only (pooling, interpolation, padding)."""

    def rule(b: "Builder", node: fx.Node) -> Dims:
        x = tensor_args(node)[0]
        nd = len(shape(x))
        kk = k(node) if callable(k) else k
        out = {}
        for d, s in b.dims_of(x).items():
            if d >= nd - kk:
                b.freeze(s, f"'{node.name}' ({describe(b, node)}) acts across channel dim {d}")
            else:
                out[d] = s
        return out

    return rule


def along_dim(name: str, pos: int, what: str) -> Rule:
    """Ops that mix values along one dim (softmax): fine unless that dim carries channels."""

    return lambda b, node: mix_along(b, node, arg(node, pos, name), what)


def mix_along(b: "Builder", node: fx.Node, d: int | None, what: str) -> Dims:
    x = tensor_args(node)[0]
    if d is None:
        return unknown(b, node)
    dims = dict(b.dims_of(x))
    d = norm_dim(d, len(shape(x)))
    if d in dims:
        b.freeze(dims.pop(d), f"'{node.name}' ({what}) mixes values across channels")
    return dims


def reduce(b: "Builder", node: fx.Node) -> Dims:
    x = tensor_args(node)[0]
    nd = len(shape(x))
    dim = arg(node, 1, "dim")
    keep = bool(arg(node, 2, "keepdim", False))
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


def reshape(b: "Builder", node: fx.Node) -> Dims:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze, from the recorded shapes."""
    x = tensor_args(node)[0]
    ins, outs = shape(x), shape(node)
    dims = b.dims_of(x)
    out: Dims = {}
    sizes_given = node.op == "call_method" and node.target in ("view", "reshape") or node.target is torch.reshape
    for bi, bo in _blocks(ins, outs):
        tracked = [d for d in bi if d in dims]
        if not tracked:
            continue
        if len(bo) > 1 or len(tracked) > 1:
            for d in tracked:
                b.freeze(dims[d], f"'{node.name}' ({describe(b, node)}) splits or interleaves channel dim {d}")
            continue
        d, o = tracked[0], bo[0]
        if len(bi) == 1:
            out[o] = dims[d]
        else:
            inner = math.prod(ins[k] for k in bi if k > d)
            idx = np.arange(outs[o])
            out[o] = b.new(node, o, outs[o])
            b.link(dims[d], out[o], ((idx // inner) % ins[d], idx))
        if sizes_given:
            b.rewrite(node, "view", o, (out[o],))
    return out


def permute(b: "Builder", node: fx.Node) -> Dims:
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


def expand(b: "Builder", node: fx.Node) -> Dims:
    x = tensor_args(node)[0]
    lead = len(shape(node)) - len(shape(x))
    out = {}
    for d, s in b.dims_of(x).items():
        if shape(x)[d] == shape(node)[d + lead]:
            out[d + lead] = s
        else:
            b.freeze(s, f"'{node.name}' expands channel dim {d}")
    return out


def getitem(b: "Builder", node: fx.Node) -> Dims:
    x, idx = node.args[0], node.args[1]
    xd = b.dims.get(x.name) if isinstance(x, fx.Node) else None
    if isinstance(xd, list):
        return xd[idx] if isinstance(idx, int) else unknown(b, node)
    if not is_tensor(x):
        return b.check_size_use(node, x, idx)
    dims, xs = b.dims_of(x), shape(x)
    items = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
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
        else:
            return unknown(b, node)
    for d in range(d_in, len(xs)):
        if d in dims:
            out[d_out + d - d_in] = dims[d]
    return out


def cat(b: "Builder", node: fx.Node) -> Dims:
    ts = [t for t in arg(node, 0, "tensors") if is_tensor(t)]
    nd = len(shape(node))
    cd = norm_dim(arg(node, 1, "dim", 0), nd)
    out: Dims = {}
    for d in range(nd):
        tracked = [b.dims_of(t)[d] for t in ts if d in b.dims_of(t)]
        if not tracked:
            continue
        if d != cd:
            for t in ts:
                if b.space(t, d) != tracked[0]:
                    b.link(tracked[0], b.space(t, d))
            out[d] = tracked[0]
            continue
        out[d] = b.new(node, d, shape(node)[d])
        off = 0
        for t in ts:
            n = shape(t)[d]
            b.link(b.space(t, d), out[d], (np.arange(n), off + np.arange(n)))
            off += n
    return out


def split(b: "Builder", node: fx.Node) -> list[Dims]:
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


def size(b: "Builder", node: fx.Node) -> Any:
    x = node.args[0]
    d = arg(node, 1, "dim")
    if node.op == "call_method" and d is not None:
        return b.check_size_use(node, x, d)
    return {"size_of": x}


# ----------------------------------------------------------------------------- parametric layers
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_like(b: "Builder", node: fx.Node, x: fx.Node, w: str, bias: str | None, groups: int, transposed: bool) -> Dims:
    cd = len(shape(node)) - len(b.param(w).shape) + 1
    cin_n, cout_n = shape(x)[cd], shape(node)[cd]
    cin = b.space(x, cd)
    out = b.new(node, cd, cout_n)
    dims = {d: s for d, s in b.dims_of(x).items() if d < cd}
    owner = node.target if node.op == "call_module" else node.name
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


def conv_module(b: "Builder", node: fx.Node) -> Dims:
    m = b.modules[node.target]
    bias = f"{node.target}.bias" if m.bias is not None else None
    return conv_like(b, node, node.args[0], f"{node.target}.weight", bias, m.groups, isinstance(m, _CONVT))


def _attr(x: Any) -> str | None:
    return x.target if isinstance(x, fx.Node) and x.op == "get_attr" else None


def conv_function(b: "Builder", node: fx.Node) -> Dims:
    w, bias, groups = arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 6, "groups", 1)
    if _attr(w) is None or (bias is not None and _attr(bias) is None) or groups != 1:
        return unknown(b, node, f"functional conv '{node.name}' with computed weights or groups>1 is not pruned")
    return conv_like(b, node, node.args[0], _attr(w), _attr(bias), 1, False)


def linear_like(b: "Builder", node: fx.Node, x: fx.Node, w: str, bias: str | None) -> Dims:
    nd = len(shape(node))
    owner = node.target if node.op == "call_module" else node.name
    cin = b.space(x, nd - 1)
    out = b.new(node, nd - 1, shape(node)[-1])
    b.bind(w, 1, cin, "consumer", owner)
    b.bind(w, 0, out, "producer", owner)
    if bias is not None:
        b.bind(bias, 0, out, "producer", owner)
    b.read(node, 0, cin, nd - 1)
    return {**{d: s for d, s in b.dims_of(x).items() if d < nd - 1}, nd - 1: out}


def linear_module(b: "Builder", node: fx.Node) -> Dims:
    m = b.modules[node.target]
    return linear_like(b, node, node.args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None)


def linear_function(b: "Builder", node: fx.Node) -> Dims:
    w, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
    if _attr(w) is None or (bias is not None and _attr(bias) is None):
        return unknown(b, node, f"functional linear '{node.name}' with computed weights is not pruned")
    return linear_like(b, node, node.args[0], _attr(w), _attr(bias))


def channel_norm(b: "Builder", node: fx.Node, names: list[str | None]) -> Dims:
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


def norm_module(b: "Builder", node: fx.Node) -> Dims:
    m = b.modules[node.target]
    names = [f"{node.target}.{p}" for p in ("weight", "bias", "running_mean", "running_var") if getattr(m, p, None) is not None]
    return channel_norm(b, node, names)


def batch_norm_function(b: "Builder", node: fx.Node) -> Dims:
    tensors = [arg(node, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    if any(t is not None and _attr(t) is None for t in tensors):
        return unknown(b, node, f"functional batch_norm '{node.name}' with computed statistics is not pruned")
    return channel_norm(b, node, [_attr(t) for t in tensors])


def layer_norm(b: "Builder", node: fx.Node) -> Dims:
    x = tensor_args(node)[0]
    if node.op == "call_module":
        k = len(b.modules[node.target].normalized_shape)
    else:
        ns = arg(node, 1, "normalized_shape")
        k = len(ns) if isinstance(ns, (tuple, list)) else 1
    return _norm_over(b, node, x, k, "LayerNorm normalises over channels")


def _norm_over(b: "Builder", node: fx.Node, x: fx.Node, k: int, why: str) -> Dims:
    nd, out = len(shape(x)), {}
    for d, s in b.dims_of(x).items():
        if d >= nd - k:
            b.freeze(s, f"{why} ('{node.name}'); pruning would change its statistics")
        else:
            out[d] = s
    return out


def group_norm(b: "Builder", node: fx.Node) -> Dims:
    x = tensor_args(node)[0]
    return _norm_over(b, node, x, len(shape(x)) - 1, "GroupNorm normalises over groups of channels")


# ----------------------------------------------------------------------------- dispatch tables
_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.Tanh, nn.ELU,
    nn.LeakyReLU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)

MODULE_RULES: list[tuple[type | tuple[type, ...], Rule]] = [
    (_CONV + _CONVT, conv_module),
    (nn.Linear, linear_module),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), norm_module),
    (nn.LayerNorm, layer_norm),
    (nn.GroupNorm, group_norm),
    (_UNARY_MODULES, passthrough),
    ((nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d), spatial(1)),
    ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), spatial(2)),
    ((nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), spatial(3)),
    (nn.Upsample, spatial(lambda n: len(shape(n)) - 2)),
    ((nn.Flatten, nn.Unflatten), reshape),
    ((nn.Softmax, nn.LogSoftmax), lambda b, n: mix_along(b, n, b.modules[n.target].dim, "softmax")),
]


_UNARY_FUNCTIONS = [
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid, F.hardsigmoid,
    F.hardswish, F.tanh, torch.tanh, F.elu, F.leaky_relu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, torch.exp, torch.neg, torch.abs, torch.sqrt, torch.rsqrt,
    torch.clamp, torch.clip, operator.neg, torch.erf, torch.square,
]
_BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.pow, operator.pow,
]
FUNCTION_RULES: dict[Any, Rule] = {
    **{f: passthrough for f in _UNARY_FUNCTIONS},
    **{f: broadcast for f in _BINARY_FUNCTIONS},
    F.conv1d: conv_function, F.conv2d: conv_function, F.conv3d: conv_function,
    F.linear: linear_function,
    F.batch_norm: batch_norm_function,
    F.layer_norm: layer_norm,
    F.group_norm: group_norm,
    F.max_pool1d: spatial(1), F.avg_pool1d: spatial(1), F.adaptive_avg_pool1d: spatial(1), F.adaptive_max_pool1d: spatial(1),
    F.max_pool2d: spatial(2), F.avg_pool2d: spatial(2), F.adaptive_avg_pool2d: spatial(2), F.adaptive_max_pool2d: spatial(2),
    F.max_pool3d: spatial(3), F.avg_pool3d: spatial(3), F.adaptive_avg_pool3d: spatial(3), F.adaptive_max_pool3d: spatial(3),
    F.interpolate: spatial(lambda n: len(shape(n)) - 2),
    F.pad: spatial(lambda n: len(arg(n, 1, "pad")) // 2),
    F.softmax: along_dim("dim", 1, "softmax"), F.log_softmax: along_dim("dim", 1, "log_softmax"),
    torch.softmax: along_dim("dim", 1, "softmax"), torch.log_softmax: along_dim("dim", 1, "log_softmax"),
    torch.flatten: reshape, torch.reshape: reshape, torch.squeeze: reshape, torch.unsqueeze: reshape,
    torch.permute: permute, torch.transpose: permute,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat,
    torch.split: split, torch.chunk: split,
    torch.mean: reduce, torch.sum: reduce, torch.amax: reduce,
    operator.getitem: getitem,
    getattr: lambda b, n: size(b, n) if n.args[1] in ("shape",) else ({} if n.args[1] in ("dtype", "device", "ndim") else unknown(b, n)),
    torch._assert: no_tensor,
    operator.eq: no_tensor, operator.ne: no_tensor, operator.floordiv: no_tensor,
}
try:  # torchvision's stochastic depth scales whole examples: channel-preserving
    from torchvision.ops import stochastic_depth as _sd

    FUNCTION_RULES[_sd] = passthrough
except ImportError:  # pragma: no cover
    pass

METHOD_RULES: dict[str, Rule] = {
    **{m: passthrough for m in (
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "float", "half", "double",
        "to", "exp", "neg", "abs", "sqrt", "rsqrt", "clamp", "clamp_", "clamp_min", "clamp_max", "detach", "square",
        "type_as", "hardtanh_", "erf")},
    **{m: broadcast for m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum")},
    "view": reshape, "reshape": reshape, "flatten": reshape, "unflatten": reshape, "squeeze": reshape,
    "unsqueeze": reshape,
    "permute": permute, "transpose": permute,
    "expand": expand,
    "split": split, "chunk": split,
    "mean": reduce, "sum": reduce, "amax": reduce,
    "softmax": along_dim("dim", 1, "softmax"), "log_softmax": along_dim("dim", 1, "log_softmax"),
    "size": size,
    "dim": no_tensor,
}


def rule_for(b: "Builder", node: fx.Node) -> Rule:
    """The rule that interprets ``node``; ``unknown`` (freeze) when there is none."""
    if node.op == "call_module":
        m = b.modules[node.target]
        if node.target in b.leaves:
            why = f"submodule '{node.target}' could not be traced and is kept whole ({b.leaves[node.target]})"
            return lambda b_, n: unknown(b_, n, why)
        if isinstance(m, nn.MultiheadAttention):
            return lambda b_, n: unknown(
                b_, n, f"nn.MultiheadAttention '{n.target}': heads and embed dim are kept (not pruned)")
        for cls, rule in MODULE_RULES:
            if isinstance(m, cls):
                return rule
        return unknown
    if node.op == "call_function":
        return FUNCTION_RULES.get(node.target, unknown)
    if node.op == "call_method":
        return METHOD_RULES.get(node.target, unknown)
    return unknown
