"""The one table of op classes: which modules, functions and methods are convolutions,
linear layers, normalisations, element-wise ops, poolings.

The analysis rules, ``residualize``, compaction (re-deriving layer sizes) and FLOP
counting all read these tuples and sets, so an op is never known to one pass and unknown
to another.

Example::

    >>> isinstance(nn.Conv2d(3, 8, 3), CONV)
    True
    >>> F.relu in ELEMENTWISE_FUNCTIONS
    True
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "CONV", "CONV_TRANSPOSE", "LINEAR", "WEIGHTED", "BATCH_NORM", "INSTANCE_NORM", "CHANNEL_NORM", "LAYER_NORM", "RMS_NORM",
    "TRAILING_NORM", "TRAILING_NORM_FUNCTIONS",
    "GROUP_NORM", "ACTIVATION_MODULES", "DROPOUT_MODULES", "ELEMENTWISE_MODULES", "POOL_MODULES",
    "ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS", "BINARY_FUNCTIONS", "BINARY_METHODS", "CONV_FUNCTIONS",
    "LINEAR_FUNCTIONS", "POOL_FUNCTIONS", "INPLACE_OPERATORS", "SIZE_SINK_METHODS", "SIZE_SINK_FUNCTIONS",
    "ADD_FUNCTIONS", "mutates",
]

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR = (nn.Linear,)
#: layers whose weight mixes input channels into output channels
WEIGHTED = CONV + CONV_TRANSPOSE + LINEAR

BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
INSTANCE_NORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: per-channel normalisations: every channel is normalised on its own
CHANNEL_NORM = BATCH_NORM + INSTANCE_NORM
LAYER_NORM = (nn.LayerNorm,)
RMS_NORM = (nn.RMSNorm,)
#: normalisations over the trailing dims, and their functional forms
TRAILING_NORM = LAYER_NORM + RMS_NORM
TRAILING_NORM_FUNCTIONS = frozenset([F.layer_norm, F.rms_norm])
GROUP_NORM = (nn.GroupNorm,)

ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.Tanh, nn.ELU,
    nn.LeakyReLU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
#: modules that act on every element alone (the output channels are the input's)
ELEMENTWISE_MODULES = ACTIVATION_MODULES + DROPOUT_MODULES

#: pooling modules by the number of trailing dims they act on
POOL_MODULES = {
    1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d),
    2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
    3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
}

ELEMENTWISE_FUNCTIONS = frozenset([
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid, F.hardsigmoid,
    F.hardswish, F.tanh, torch.tanh, F.elu, F.leaky_relu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, torch.exp, torch.neg, torch.abs, torch.sqrt, torch.rsqrt,
    torch.clamp, torch.clip, operator.neg, torch.erf, torch.square, torch.clone, torch.clamp_min,
])
ELEMENTWISE_METHODS = frozenset([
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "float", "half", "double",
    "bfloat16", "to", "exp", "neg", "abs", "sqrt", "rsqrt", "clamp", "clamp_", "clamp_min", "clamp_max", "detach",
    "square", "type_as", "hardtanh_", "erf", "zero_", "fill_",
])
#: element-wise ops of several tensors, with broadcasting
BINARY_FUNCTIONS = frozenset([
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.pow, operator.pow,
])
BINARY_METHODS = frozenset(["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum"])
#: the adds a residual branch ends in
ADD_FUNCTIONS = frozenset([operator.add, operator.iadd, torch.add])

CONV_FUNCTIONS = frozenset([F.conv1d, F.conv2d, F.conv3d])
LINEAR_FUNCTIONS = frozenset([F.linear])
POOL_FUNCTIONS = {
    1: frozenset([F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d]),
    2: frozenset([F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d]),
    3: frozenset([F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d]),
}

#: in-place operators and their out-of-place forms
INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                     operator.itruediv: operator.truediv}

#: ops that take sizes and recompute from a size read at run time (``x.view(B, C, -1)``)
SIZE_SINK_METHODS = frozenset(["view", "reshape", "expand", "unflatten"])
SIZE_SINK_FUNCTIONS = frozenset([torch.reshape, torch.unflatten])



def mutates(node: fx.Node) -> bool:
    """An op that writes into a tensor it is given (``x[...] = y``, ``x += y`` on a view,
    ``bias.clone()[a:b].zero_()``, ``aten.copy_``): what it writes may reach the output
    through that tensor, with no edge from it, so dead-code elimination must keep it."""
    if node.op == "call_function" and node.target in INPLACE_OPERATORS:
        return True
    if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).endswith("__"):
        return True
    if node.op == "call_function" and _inplace_flag(node) and _read_later(node):  # F.relu(y, inplace=True)
        return True  # writes y, which a later node reads: kept though its own result is unused
    return node.op == "call_function" and node.is_impure()


def _read_later(node: fx.Node) -> bool:
    """The tensor ``node`` writes in place (its first argument) is read by a node after it."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return False
    others = {u for u in x.users if u is not node}
    n = node.next
    while others and n.op != "root":
        if n in others:
            return True
        n = n.next
    return False


def _inplace_flag(node: fx.Node) -> bool:
    """``inplace=True`` given to a functional (``F.relu(x, True)``, ``F.dropout(x, p, t, True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if not any(a is True for a in node.args):  # the signature is read only where a literal True could be it
        return False
    try:
        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return False
    i = params.index("inplace") if "inplace" in params else -1
    return 0 <= i < len(node.args) and node.args[i] is True
