"""Shape propagation: run the graph once and record every node's output shape, dtype and
type in ``node.meta`` (``tensor_meta``, ``type``), as ``torch.fx``'s ``ShapeProp`` does.

:class:`AdaptiveShapeProp` runs nodes for real while that is cheap and finishes on the
``meta`` device: a real forward costs its FLOPs, a meta run a roughly fixed amount of
Python per node. Light models finish for real, heavy ones mostly on meta, and no model
costs more than about two meta runs. An op without a meta kernel (or one that needs
values) makes the pass start again and run everything for real; an error while running
for real is the model's or the inputs', and is raised with the node named.

Example::

    >>> gm = torch.fx.symbolic_trace(model)
    >>> propagate_shapes(gm, (torch.randn(2, 3, 32, 32),))
    >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["tensor_meta"].shape
    torch.Size([2, 64, 16, 16])
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_map

__all__ = ["AdaptiveShapeProp", "ShapePropError", "propagate_shapes"]


class ShapePropError(RuntimeError):
    """Running a node on the example inputs failed; ``node`` names it."""

    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        first = str(cause).splitlines()[0] if str(cause) else ""
        super().__init__(f"node '{node.name}' ({node.op} {node.target}): {type(cause).__name__}: {first}")
        self.node, self.cause = node, cause


class _MetaFailed(Exception):
    """A node failed on the meta device (no meta kernel, or it needs values)."""


def _record(n: fx.Node, result: Any) -> None:
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    meta = map_aggregate(result, extract)
    if found:
        n.meta["tensor_meta"] = meta
    n.meta["type"] = type(result)


def _to_meta(t: Any) -> Any:
    return t.to("meta") if isinstance(t, torch.Tensor) else t


class AdaptiveShapeProp(ShapeProp):
    """``ShapeProp`` that runs nodes for real until ``meta_seconds_per_node`` times the
    node count has been spent (about what a whole meta run costs), then on ``meta``.
    ``meta=False`` runs everything for real."""

    def __init__(self, gm: fx.GraphModule, meta_seconds_per_node: float = 3e-4, meta: bool = True) -> None:
        super().__init__(gm)
        self.budget = meta_seconds_per_node * len(gm.graph.nodes) if meta else float("inf")
        self.on_meta, self._seconds = False, 0.0

    def run_node(self, n: fx.Node) -> Any:
        t0 = time.perf_counter()
        try:
            result = fx.Interpreter.run_node(self, n)
        except Exception as exc:
            if self.on_meta:
                raise _MetaFailed() from exc
            raise ShapePropError(n, exc) from exc
        _record(n, result)
        if not self.on_meta:
            self._seconds += time.perf_counter() - t0
            if self._seconds > self.budget and n.op != "output":
                self._switch_to_meta()
                return tree_map(_to_meta, result)
        return result

    def _switch_to_meta(self) -> None:
        self.on_meta = True
        metas = {k: torch.empty_like(v, device="meta")
                 for k, v in [*self.module.named_parameters(), *self.module.named_buffers()]}
        self._stack.enter_context(_reparametrize_module(self.module, metas))
        self.env = {k: tree_map(_to_meta, v) for k, v in self.env.items()}

    def propagate(self, *args: Any) -> Any:
        with contextlib.ExitStack() as self._stack:
            return super().propagate(*args)


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...], meta_seconds_per_node: float = 3e-4) -> None:
    """Shapes into ``node.meta``, for real while cheap then on meta; everything for real
    when a node has no meta kernel. Raises :class:`ShapePropError` naming the node that
    failed for real."""
    with torch.no_grad():
        try:
            AdaptiveShapeProp(gm, meta_seconds_per_node).propagate(*inputs)
        except _MetaFailed:
            AdaptiveShapeProp(gm, meta=False).propagate(*inputs)
