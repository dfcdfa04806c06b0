"""Where a LayerNorm, RMSNorm or GroupNorm call keeps its input, affine tensors and epsilon.

The analysis (which dims the norm reads), gate insertion (the gated model's norm with
masked statistics) and stripping the gates (back to the plain norm) all read a norm call
through :func:`norm_call`, so the argument layouts of ``nn.LayerNorm``, ``nn.RMSNorm``,
``F.layer_norm(x, shape, weight, bias, eps)``, ``F.rms_norm(x, shape, weight, eps)``,
``nn.GroupNorm`` and ``F.group_norm(x, groups, weight, bias, eps)`` are spelled out once.

Example::

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.LayerNorm(64)))
    >>> node = next(n for n in gm.graph.nodes if n.op == "call_module")   # self.0(input), an nn.LayerNorm(64)
    >>> norm_call(node, dict(gm.named_modules()))
    NormCall(kind='layer', x=input_1, ndims=1, weight='0.weight', bias='0.bias', eps=1e-05, normalized_shape=None,
             groups=None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from .op_classes import GROUP_NORM, RMS_NORM, TRAILING_NORM

__all__ = ["NormCall", "norm_call", "original", "restore_norm"]


@dataclass
class NormCall:
    """``kind`` "layer", "rms" or "group"; ``ndims`` trailing dims normalised (a group
    norm: every dim from 1); ``groups`` a group norm's number of groups; ``weight`` and
    ``bias``: the module's tensor path (``call_module``), the argument node (a function
    call) or None; ``eps`` (None: the dtype's machine epsilon, RMSNorm's default);
    ``normalized_shape``: the function's argument (None for a module)."""

    kind: str
    x: fx.Node
    ndims: int
    weight: str | fx.Node | None
    bias: str | fx.Node | None
    eps: float | None
    normalized_shape: Any = None
    groups: Any = None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def norm_call(node: fx.Node, modules: dict[str, nn.Module]) -> NormCall | None:
    """The parts of a LayerNorm / RMSNorm / GroupNorm call (module or function); None for other nodes."""
    if node.op == "call_module" and isinstance(modules.get(node.target), TRAILING_NORM):
        m = modules[node.target]
        w = f"{node.target}.weight" if getattr(m, "weight", None) is not None else None
        b = f"{node.target}.bias" if getattr(m, "bias", None) is not None else None
        return NormCall("rms" if isinstance(m, RMS_NORM) else "layer", node.args[0], len(m.normalized_shape), w, b, m.eps)
    if node.op == "call_module" and isinstance(modules.get(node.target), GROUP_NORM):
        m = modules[node.target]
        w = f"{node.target}.weight" if m.weight is not None else None
        b = f"{node.target}.bias" if m.bias is not None else None
        return NormCall("group", node.args[0], None, w, b, m.eps, None, m.num_groups)
    if node.op == "call_function" and node.target is F.group_norm:
        return NormCall("group", _arg(node, 0, "input"), None, _arg(node, 2, "weight"), _arg(node, 3, "bias"),
                        _arg(node, 4, "eps", 1e-5), None, _arg(node, 1, "num_groups"))
    if node.op == "call_function" and node.target in (F.layer_norm, F.rms_norm):
        ns = _arg(node, 1, "normalized_shape")
        k = len(ns) if isinstance(ns, (tuple, list)) else 1
        x = _arg(node, 0, "input")
        if node.target is F.layer_norm:
            return NormCall("layer", x, k, _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5), ns)
        return NormCall("rms", x, k, _arg(node, 2, "weight"), None, _arg(node, 3, "eps"), ns)
    return None


def original(node: fx.Node, nc: NormCall) -> dict[str, Any]:
    """What :func:`restore_norm` needs, besides the tensors, to turn ``node`` (the norm call
    ``nc`` read) back into that call (constants only: it is kept in ``node.meta``, which
    graph copies share)."""
    return {"op": node.op, "target": node.target, "eps": nc.eps, "groups": nc.groups}


def restore_norm(node: fx.Node, spec: dict[str, Any], x: fx.Node, weight: fx.Node | None,
                 bias: fx.Node | None, normalized_shape: Any) -> None:
    """Make ``node`` the plain norm call ``spec`` (from :func:`original`) again, on ``x``."""
    node.op, node.target, node.kwargs = spec["op"], spec["target"], {}
    if spec["op"] == "call_module":
        node.args = (x,)
    elif spec["target"] is F.group_norm:
        node.args = (x, spec["groups"], weight, bias, spec["eps"])
    elif spec["target"] is F.layer_norm:
        node.args = (x, normalized_shape, weight, bias, spec["eps"])
    else:
        node.args = (x, normalized_shape, weight, spec["eps"])
