"""Residualize pass: wrap the nonlinear sections of a plain network in shortcuts, so that
layer gates can remove whole sections (paper B).

A *layer* is a convolution or linear module with the per-element ops that follow it
(normalisation, activation, dropout); a *section* is ``size`` consecutive layers. Each
section ``F`` reading ``x`` becomes ``y = s(x) + F(x)``: ``s`` is the identity when
``F(x)`` has the shape of ``x``, else a projection (a 1x1 convolution with the stride the
spatial sizes imply, or a Linear layer). Removing ``F`` then leaves ``y = s(x)``.

The shortcut changes the model's function: it is meant for training from scratch.
Sections that feed the model's output, or whose shapes no projection maps, are left as
they are, with the reason in ``Residualize.skipped``.

Example::

    >>> gm = residualize(vgg(), (x,))        # then fxprune.prepare(gm, (x,))
    >>> len(gm.meta[RESIDUALIZE_META].sections) > 0
    True
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .analysis.generic import shape
from .op_classes import BATCH_NORM, CONV, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, ELEMENTWISE_MODULES, LINEAR
from .trace import trace

__all__ = ["Residualize", "residualize", "Section", "RESIDUALIZE_META"]

_WEIGHTED = CONV + LINEAR
#: what follows a conv or linear layer inside one section: normalisation, activation, dropout
_PER_ELEMENT_MODULES = BATCH_NORM + ELEMENTWISE_MODULES

_CONV_BY_RANK = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
#: ``gm.meta`` key of the :class:`Residualize` pass that wrapped a model (its sections)
RESIDUALIZE_META = "fxprune_residualize"


@dataclass(frozen=True)
class NoShortcut:
    """Why a section gets no shortcut (it is left as it is, and reported)."""

    reason: str


@dataclass(frozen=True)
class Section:
    """A wrapped section: its nodes (first to last), and the shortcut (``"identity"`` or the
    projection's module name)."""

    nodes: tuple[str, ...]
    shortcut: str


class Residualize(PassBase):
    """Wrap every run of ``size`` layers in a shortcut, in place; modules whose names are in
    ``exclude`` are left alone. ``gm`` needs shapes in ``node.meta`` (from
    :func:`fxprune.trace`)."""

    def __init__(self, size: int = 1, exclude: tuple[str, ...] = ()) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"Residualize: size must be >= 1, got {size}")
        self.size, self.exclude = size, set(exclude)
        self.sections: list[Section] = []
        self.skipped: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ finding sections
    def _module(self, gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
        return gm.get_submodule(node.target) if node.op == "call_module" else None

    def _per_element(self, gm: fx.GraphModule, node: fx.Node, prev: fx.Node) -> bool:
        if not node.args or node.args[0] is not prev:
            return False
        if node.op == "call_module":
            return isinstance(self._module(gm, node), _PER_ELEMENT_MODULES)
        if node.op == "call_function":
            return node.target in ELEMENTWISE_FUNCTIONS
        return node.op == "call_method" and node.target in ELEMENTWISE_METHODS

    def _layer(self, gm: fx.GraphModule, w: fx.Node) -> list[fx.Node]:
        """``w`` and the per-element ops that follow it alone."""
        layer = [w]
        while len(layer[-1].users) == 1:
            nxt = next(iter(layer[-1].users))
            if not self._per_element(gm, nxt, layer[-1]):
                break
            layer.append(nxt)
        return layer

    def _sections(self, gm: fx.GraphModule) -> list[list[fx.Node]]:
        out: list[list[fx.Node]] = []
        taken: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if node in taken or not isinstance(self._module(gm, node), _WEIGHTED) or node.target in self.exclude:
                continue
            section = self._layer(gm, node)
            for _ in range(self.size - 1):
                nxt = next(iter(section[-1].users)) if len(section[-1].users) == 1 else None
                if nxt is None or nxt.args[0] is not section[-1] or not isinstance(self._module(gm, nxt), _WEIGHTED) \
                        or nxt.target in self.exclude:
                    break
                section += self._layer(gm, nxt)
            taken.update(section)
            out.append(section)
        return out

    # ------------------------------------------------------------------ the shortcut
    def _shortcut(self, gm: fx.GraphModule, section: list[fx.Node]) -> nn.Module | Literal["identity"] | NoShortcut:
        """``"identity"``, a projection module, or why there is no shortcut."""
        x, y = section[0].args[0], section[-1]
        sx, sy = shape(x), shape(y)
        if sx is None or sy is None:
            return NoShortcut("no shapes recorded")
        if sx == sy:
            return "identity"
        if len(sx) != len(sy) or sx[0] != sy[0]:
            return NoShortcut(f"input {tuple(sx)} and output {tuple(sy)} differ in rank or batch")
        first = self._module(gm, section[0])
        if isinstance(first, nn.Linear):
            if sx[:-1] != sy[:-1]:
                return NoShortcut(f"input {tuple(sx)} and output {tuple(sy)} differ outside the features")
            return nn.Linear(sx[-1], sy[-1])
        if len(sx) not in _CONV_BY_RANK:
            return NoShortcut(f"no projection for rank {len(sx)}")
        strides = [-(-a // b) if b else 0 for a, b in zip(sx[2:], sy[2:])]
        if not all(strides) or any((a - 1) // s + 1 != b for a, b, s in zip(sx[2:], sy[2:], strides)):
            return NoShortcut(f"spatial size {tuple(sx[2:])} -> {tuple(sy[2:])} is not a stride")
        return _CONV_BY_RANK[len(sx)](sx[1], sy[1], 1, stride=tuple(strides), bias=False)

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        plans = [(section, self._shortcut(gm, section)) for section in self._sections(gm)]  # shapes before rewriting
        for section, shortcut in plans:
            y, name = section[-1], section[0].target
            if any(u.op == "output" for u in y.users):
                self.skipped.append((name, "its output is the model's output"))
                continue
            if isinstance(shortcut, NoShortcut):
                self.skipped.append((name, shortcut.reason))
                continue
            x = section[0].args[0]  # the previous section's add, if that section was wrapped
            users = list(y.users)
            with graph.inserting_after(y):
                if isinstance(shortcut, nn.Module):
                    key = _free_name(gm, f"shortcut{len(self.sections)}")
                    gm.add_submodule(key, shortcut.to(next(gm.get_submodule(name).parameters()).device))
                    s = graph.call_module(key, (x,))
                    label = key
                else:
                    s, label = x, "identity"
            with graph.inserting_after(s if s is not x else y):
                add = graph.call_function(operator.add, (s, y))
            for u in users:
                u.replace_input_with(y, add)
            self.sections.append(Section(tuple(n.name for n in section), label))
        graph.lint()
        gm.recompile()
        return PassResult(gm, bool(self.sections))


def _free_name(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ... if the model already has an attribute of that name."""
    candidate, k = name, 0
    while hasattr(gm, candidate):
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def residualize(model: nn.Module, example_inputs: tuple[Any, ...] | torch.Tensor, size: int = 1,
                exclude: tuple[str, ...] = ()) -> fx.GraphModule:
    """Trace ``model`` and wrap its sections of ``size`` layers in shortcuts (see the module
    docstring). Raises ``ValueError`` naming the reasons if no section could be wrapped."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace(model, example_inputs)
    p = Residualize(size, exclude)
    p(gm)
    if not p.sections:
        why = "; ".join(f"'{n}': {r}" for n, r in p.skipped) or "it has no conv or linear layer"
        raise ValueError(f"residualize found no section to wrap ({why})")
    gm.meta[RESIDUALIZE_META] = p
    return gm
