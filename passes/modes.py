"""Train and eval mode in a traced graph.

Symbolic tracing runs the forward once, so ``self.training`` is read at trace time:
``F.dropout(x, p, training=self.training)`` becomes a call with a constant flag, and an
``if self.training:`` branch is in the graph or not. Two passes deal with that:

* :class:`FollowModuleMode` replaces functional dropout (and torchvision's stochastic
  depth) called with a constant flag by the equivalent module, whose flag follows
  ``train()`` / ``eval()`` of the model;
* :func:`first_difference` compares the graphs traced in train and in eval mode and
  names the first node where they part (training-only code), or returns None.

Example::

    >>> class Net(nn.Module):
    ...     def forward(self, x):
    ...         return F.dropout(x, 0.5, self.training)
    >>> gm = fx.symbolic_trace(Net().eval())   # F.dropout(x, 0.5, False): the flag is a constant
    >>> FollowModuleMode()(gm).modified        # -> self.dropout_0(x), an nn.Dropout(0.5)
    True
    >>> bool(gm.train()(torch.ones(4, 100)).eq(0).any())   # it follows train() now
    True
"""

from __future__ import annotations

import operator
from typing import Any

import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["FollowModuleMode", "first_difference", "MODE_RATE"]

#: ``node.meta`` key of the nodes that make an attention's dropout rate follow the mode
MODE_RATE = "fxprune_mode_rate"

#: functional op -> (module class, position of p, position of the training flag, extra args -> module kwargs)
_DROPOUTS: dict[Any, tuple[type, int, int, Any]] = {
    F.dropout: (nn.Dropout, 1, 2, lambda a: {"inplace": a.get(3, False)}),
    F.dropout1d: (nn.Dropout1d, 1, 2, lambda a: {"inplace": a.get(3, False)}),
    F.dropout2d: (nn.Dropout2d, 1, 2, lambda a: {"inplace": a.get(3, False)}),
    F.dropout3d: (nn.Dropout3d, 1, 2, lambda a: {"inplace": a.get(3, False)}),
    F.alpha_dropout: (nn.AlphaDropout, 1, 2, lambda a: {"inplace": a.get(3, False)}),
    F.feature_alpha_dropout: (nn.FeatureAlphaDropout, 1, 2, lambda a: {"inplace": a.get(3, False)}),
}
_NAMES = {1: "p", 2: "training", 3: "inplace"}
try:  # torchvision's stochastic depth: (input, p, mode, training)
    from torchvision.ops import StochasticDepth, stochastic_depth

    _DROPOUTS[stochastic_depth] = (StochasticDepth, 1, 3, lambda a: {"mode": a.get(2, "row")})
    _SD_NAMES = {1: "p", 2: "mode", 3: "training"}
except ImportError:  # pragma: no cover
    _SD_NAMES = {}


def _positional(node: fx.Node, names: dict[int, str]) -> dict[int, Any]:
    """The node's arguments by position (keyword ones mapped with ``names``)."""
    out = dict(enumerate(node.args))
    for pos, name in names.items():
        if name in node.kwargs:
            out[pos] = node.kwargs[name]
    return out


class FollowModuleMode(PassBase):
    """Functional dropout called with a constant ``training`` flag becomes the module of
    the same kind (``F.dropout`` -> ``nn.Dropout``, ...), added to ``gm``: its flag then
    follows ``gm.train()`` / ``gm.eval()``. ``replaced`` lists the nodes rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.replaced: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in list(gm.graph.nodes):
            spec = _DROPOUTS.get(node.target) if node.op == "call_function" else None
            if spec is None:
                continue
            cls, p_pos, flag_pos, extra = spec
            args = _positional(node, _SD_NAMES if cls.__name__ == "StochasticDepth" else _NAMES)
            p, flag = args.get(p_pos, 0.5), args.get(flag_pos, True)
            if not isinstance(flag, bool) or isinstance(p, fx.Node):
                continue
            name, k = f"{node.name}_module", 0
            while hasattr(gm, name):
                k += 1
                name = f"{node.name}_module_{k}"
            gm.add_submodule(name, cls(p, **extra(args)))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            self.replaced.append(node.name)
        self._attention_dropout(gm)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(self.replaced))

    def _attention_dropout(self, gm: fx.GraphModule) -> None:
        """``F.scaled_dot_product_attention(..., dropout_p=p)`` with a constant ``p > 0`` (a
        forward traced in training mode: ``dropout_p=self.p if self.training else 0.0``)
        gets ``dropout_p=p * self.training``: the attention's dropout follows the mode too."""
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
                continue
            p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
            if isinstance(p, fx.Node) or not p:
                continue
            with gm.graph.inserting_before(node):
                flag = gm.graph.create_node("get_attr", "training")  # a flag, not a tensor: no reference check
                rate = gm.graph.call_function(operator.mul, (flag, float(p)))
            flag.meta[MODE_RATE] = rate.meta[MODE_RATE] = True
            if len(node.args) > 4:
                node.update_arg(4, rate)
            else:
                node.update_kwarg("dropout_p", rate)
            self.replaced.append(node.name)


def _describe(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    where = next(reversed(stack.values()))[0] if stack else ""
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}' ({node.op} {what}{f' in module {where!r}' if where else ''})"


def _layout_only(node: fx.Node) -> bool:
    """A node that changes no value: ``x.contiguous()`` (the training graph of an attention
    with dropout has one where the eval graph has none), or a mode-following rate's own nodes."""
    return MODE_RATE in node.meta or (node.op == "call_method" and node.target == "contiguous")


def _signatures(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Every node but the layout-only ones, with what it computes from which earlier node
    (by position, so the names a trace numbers do not count); a mode-following dropout
    rate reads as the eval mode's 0, and a rate of 0 as the default it is."""
    index: dict[fx.Node, Any] = {}
    out: list[tuple[fx.Node, str]] = []

    def ref(v: Any) -> Any:
        return fx.map_arg(v, lambda n: index[n])

    for n in gm.graph.nodes:
        if _layout_only(n):
            index[n] = index[n.args[0]] if n.op == "call_method" else 0.0
            continue
        index[n] = f"%{len(out)}"
        kwargs = dict(ref(dict(n.kwargs)))
        if n.target is F.scaled_dot_product_attention and kwargs.get("dropout_p") == 0.0:
            kwargs.pop("dropout_p")
        args = ref(n.args)
        if n.target is F.scaled_dot_product_attention and len(args) > 4 and args[4] == 0.0:
            args = args[:4] + (None,) + args[5:]
        out.append((n, f"{n.op} {n.target} {args} {kwargs}"))
    return out


def first_difference(train: fx.GraphModule, eval_: fx.GraphModule) -> str | None:
    """Where the graphs traced in train and eval mode part, in words; None if they compute
    the same (up to layout-only nodes, :func:`_layout_only`)."""
    if train.code == eval_.code:
        return None
    a, b = _signatures(train), _signatures(eval_)
    for (x, sx), (y, sy) in zip(a, b):
        if sx != sy:
            return f"in train mode the graph runs {_describe(x)} where in eval mode it runs {_describe(y)}"
    if len(a) == len(b):
        return None
    longer, mode = (a, "train") if len(a) > len(b) else (b, "eval")
    return f"only in {mode} mode the graph runs {_describe(longer[min(len(a), len(b))][0])}"
