"""What each op does to channel spaces: the dispatch table of the dependency analysis.

Any op without a rule freezes every channel it touches: it is never assumed to be
channel-preserving. The op classes come from :mod:`fxprune.passes.op_classes`; the rules
live in :mod:`.generic` (element-wise, reductions, pooling), :mod:`.shapes` (dims
moving) and :mod:`.layers` (layers with parameters); the tables are fixed at import, and
rules for other modules, functions and methods are registered with
:func:`fxprune.passes.register_rule` (checked first).
"""

from __future__ import annotations

import operator
import types
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import op_classes as ops
from ..rules import register_rule, registered_function_rule, registered_method_rule, registered_module_rule
from ..tracer import autograd_function_of
from .attention import sdpa
from .generic import (
    Rule,
    along_dim,
    arg,
    broadcast,
    matmul,
    mix_along,
    no_tensor,
    pad,
    passthrough,
    reduce,
    roll,
    shape,
    spatial,
    unknown,
    vector_norm,
)
from .layers import (
    addmm_function,
    batch_norm_function,
    conv_function,
    conv_module,
    embedding,
    group_norm,
    linear_function,
    linear_module,
    norm_module,
    trailing_norm,
)
from .shapes import cat, expand, expand_as, getitem, permute, repeat_interleave, reshape, size, split, unbind

if TYPE_CHECKING:  # pragma: no cover
    from .builder import Builder

__all__ = ["rule_for", "register_rule", "unread_functions", "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES"]


def _spatial_last_all(n: fx.Node) -> int:
    return len(shape(n)) - 2


MODULE_RULES: list[tuple[type | tuple[type, ...], Rule]] = [
    (ops.CONV + ops.CONV_TRANSPOSE, conv_module),
    (ops.LINEAR, linear_module),
    (ops.CHANNEL_NORM, norm_module),
    (ops.TRAILING_NORM, trailing_norm),
    (ops.GROUP_NORM, group_norm),
    (ops.ELEMENTWISE_MODULES, passthrough),
    *[(classes, spatial(k)) for k, classes in ops.POOL_MODULES.items()],
    (nn.Upsample, spatial(_spatial_last_all)),
    ((nn.Flatten, nn.Unflatten), reshape),
    (nn.Embedding, embedding),
    ((nn.Softmax, nn.LogSoftmax), lambda b, n: mix_along(b, n, b.modules[n.target].dim, "softmax")),
]


def _getattr(b: Builder, n: fx.Node) -> Any:
    if n.args[1] == "shape":
        return size(b, n)
    return {} if n.args[1] in ("dtype", "device", "ndim") else unknown(b, n)


FUNCTION_RULES: dict[Any, Rule] = {
    **dict.fromkeys(ops.ELEMENTWISE_FUNCTIONS, passthrough),
    **dict.fromkeys(ops.BINARY_FUNCTIONS, broadcast),
    **dict.fromkeys(ops.CONV_FUNCTIONS, conv_function),
    **dict.fromkeys(ops.LINEAR_FUNCTIONS, linear_function), torch.addmm: addmm_function,
    **{f: spatial(k) for k, fs in ops.POOL_FUNCTIONS.items() for f in fs},
    F.batch_norm: batch_norm_function,
    F.embedding: embedding,
    **dict.fromkeys(ops.TRAILING_NORM_FUNCTIONS, trailing_norm),
    F.group_norm: group_norm,
    F.interpolate: spatial(_spatial_last_all),
    F.pad: pad,
    F.softmax: along_dim("dim", 1, "softmax"), F.log_softmax: along_dim("dim", 1, "log_softmax"),
    torch.softmax: along_dim("dim", 1, "softmax"), torch.log_softmax: along_dim("dim", 1, "log_softmax"),
    torch.flatten: reshape, torch.reshape: reshape, torch.squeeze: reshape, torch.unsqueeze: reshape,
    torch.unflatten: reshape,
    torch.permute: permute, torch.transpose: permute,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat,
    torch.split: split, torch.chunk: split, torch.unbind: unbind,
    F.scaled_dot_product_attention: sdpa, torch.repeat_interleave: repeat_interleave,
    torch.mean: reduce, torch.sum: reduce, torch.amax: reduce, torch.linalg.vector_norm: vector_norm,
    F.normalize: lambda b, n: mix_along(b, n, arg(n, 2, "dim", 1), "normalize"),
    torch.matmul: matmul, operator.matmul: matmul, torch.bmm: matmul, torch.roll: roll,
    operator.getitem: getitem,
    getattr: _getattr,
    torch._assert: no_tensor,
    operator.eq: no_tensor, operator.ne: no_tensor, operator.floordiv: no_tensor,
}
try:  # torchvision's stochastic depth scales whole examples: channel-preserving
    from torchvision.ops import StochasticDepth as _SD
    from torchvision.ops import stochastic_depth as _sd
except ImportError:  # pragma: no cover
    _SD = _sd = None
if _SD is not None:
    FUNCTION_RULES = {**FUNCTION_RULES, _sd: passthrough}
    MODULE_RULES = [*MODULE_RULES, (_SD, passthrough)]

METHOD_RULES: dict[str, Rule] = {
    **dict.fromkeys(ops.ELEMENTWISE_METHODS, passthrough),
    **dict.fromkeys(ops.BINARY_METHODS, broadcast),
    "view": reshape, "reshape": reshape, "flatten": reshape, "unflatten": reshape, "squeeze": reshape,
    "unsqueeze": reshape,
    "permute": permute, "transpose": permute,
    "expand": expand, "expand_as": expand_as,
    "split": split, "chunk": split, "unbind": unbind, "repeat_interleave": repeat_interleave,
    "mean": reduce, "sum": reduce, "amax": reduce,
    "matmul": matmul, "bmm": matmul, "roll": roll,
    "softmax": along_dim("dim", 1, "softmax"), "log_softmax": along_dim("dim", 1, "log_softmax"),
    "size": size,
    "dim": no_tensor,
    # a new tensor of given sizes: reads only the dtype and device of the tensor it is called on (a size
    # that is a channel count meets those channels later, in a broadcast, and freezes them there)
    **dict.fromkeys(("new_zeros", "new_ones", "new_empty", "new_full"), no_tensor),
}


def rule_for(b: Builder, node: fx.Node) -> Rule:
    """The rule that interprets ``node``; ``unknown`` (freeze) when there is none."""
    if node.op == "call_module":
        m = b.modules[node.target]
        registered = registered_module_rule(m)
        if registered is not None:
            return registered
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
        fn = autograd_function_of(node.target)
        if fn is not None:
            why = f"custom autograd.Function {fn.__name__} ('{node.name}') is kept whole, with its own backward"
            return lambda b_, n: unknown(b_, n, why)
        return registered_function_rule(node.target) or FUNCTION_RULES.get(node.target, unknown)
    if node.op == "call_method":
        return registered_method_rule(node.target) or METHOD_RULES.get(node.target, unknown)
    return unknown


def unread_functions(gm: fx.GraphModule) -> list[str]:
    """Python functions a symbolic trace kept whole (``torch.fx.wrap``'d, such as
    torchvision's ``shifted_window_attention``) that no rule reads: the analysis freezes
    every channel they touch, where ``torch.export`` would see the ops inside."""
    names = []
    for node in gm.graph.nodes:
        fn = node.target
        if (node.op == "call_function" and isinstance(fn, types.FunctionType) and fn not in FUNCTION_RULES
                and registered_function_rule(fn) is None and autograd_function_of(fn) is None
                and getattr(fn, "__module__", "").split(".")[0] not in ("torch", "operator", "math", "builtins")):
            names.append(fn.__name__)
    return sorted(set(names))
