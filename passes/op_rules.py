"""What each op does to channel spaces: the dispatch table of the dependency analysis.

Any op without a rule freezes every channel it touches: it is never assumed to be
channel-preserving. The rules themselves live in :mod:`.op_helpers` (generic),
:mod:`.shape_rules` (dims moving) and :mod:`.layer_rules` (layers with parameters).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layer_rules import (
    _CONV, _CONVT, batch_norm_function, conv_function, conv_module, group_norm, layer_norm, linear_function,
    linear_module, norm_module,
)
from .op_helpers import (
    Dims, Rule, along_dim, arg, broadcast, describe, is_tensor, mix_along, no_tensor, passthrough, reduce, shape,
    spatial, tensor_args, unknown,
)
from .shape_rules import cat, expand, getitem, permute, reshape, size, split

if TYPE_CHECKING:  # pragma: no cover
    from .analyze import Builder

__all__ = ["rule_for", "Dims", "describe", "is_tensor", "shape", "tensor_args"]


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
