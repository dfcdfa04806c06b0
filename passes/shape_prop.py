"""Shape propagation: run the graph once and record every node's output shape, dtype and
type in ``node.meta`` (``tensor_meta``, ``type``), as ``torch.fx``'s ``ShapeProp`` does.

:class:`AdaptiveShapeProp` can run nodes for real while that is cheap and finish on the
``meta`` device: a real forward costs its FLOPs, a meta run a roughly fixed amount of
Python per node. On meta, an op that keeps its input's shape (a norm, an activation: the
op-class table says which) passes its input on instead of running (BatchNorm's meta
kernel alone is a Python decomposition of several milliseconds), which makes a meta run
cheaper than a real one for every torchvision model at 224x224: :func:`propagate_shapes`
therefore starts on meta (``meta_seconds_per_node=0``). An op without a meta kernel (or
one that needs values) makes the pass start again and run everything for real; an error
while running for real is the model's or the inputs', and is raised with the node named.

Example::

    >>> gm = torch.fx.symbolic_trace(torchvision.models.resnet18())
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
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_map

from .op_classes import (
    CHANNEL_NORM,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    GROUP_NORM,
    LAYER_NORM,
)

__all__ = ["AdaptiveShapeProp", "ShapePropError", "propagate_shapes"]


class ShapePropError(RuntimeError):
    """Running a node on the example inputs failed; ``node`` names it."""

    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        first = str(cause).splitlines()[0] if str(cause) else ""
        super().__init__(f"node '{node.name}' ({node.op} {node.target}): {type(cause).__name__}: {first}")
        self.node, self.cause = node, cause


class _MetaFailed(Exception):
    """A node failed on the meta device (no meta kernel, or it needs values)."""


def _metadata(t: torch.Tensor) -> TensorMetadata:
    """``ShapeProp``'s record of a tensor, without probing memory formats and quantization
    (about 70 us a node; nothing downstream reads them)."""
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), None, False, {})


def _record(n: fx.Node, result: Any) -> None:
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return _metadata(obj)
        return obj

    meta = map_aggregate(result, extract)
    if found:
        n.meta["tensor_meta"] = meta
    n.meta["type"] = type(result)


_SHAPE_KEEPING_MODULES = CHANNEL_NORM + LAYER_NORM + GROUP_NORM + ELEMENTWISE_MODULES
#: element-wise methods that keep the dtype too (not ``to``, ``float``, ``type_as``, ...)
_SHAPE_KEEPING_METHODS = ELEMENTWISE_METHODS - {"to", "float", "half", "double", "bfloat16", "type_as"}


def _to_meta(t: Any) -> Any:
    return t.to("meta") if isinstance(t, torch.Tensor) else t


class AdaptiveShapeProp(ShapeProp):
    """``ShapeProp`` that runs nodes for real until ``meta_seconds_per_node`` times the
    node count has been spent, then on ``meta`` (0: meta after the first node).
    ``meta=False`` runs everything for real."""

    def __init__(self, gm: fx.GraphModule, meta_seconds_per_node: float = 3e-4, meta: bool = True) -> None:
        super().__init__(gm)
        self.budget = meta_seconds_per_node * len(gm.graph.nodes) if meta else float("inf")
        self.on_meta, self._seconds = False, 0.0

    def _keeps_shape(self, n: fx.Node) -> bool:
        """An op that returns a tensor shaped like its input (norms, activations): on
        meta there is nothing to compute (BatchNorm's meta kernel alone is a Python
        decomposition of several milliseconds)."""
        if not n.args or not isinstance(n.args[0], fx.Node):
            return False
        if n.op == "call_module":
            return isinstance(self.module.get_submodule(n.target), _SHAPE_KEEPING_MODULES)
        if n.op == "call_method":
            return n.target in _SHAPE_KEEPING_METHODS and len(n.all_input_nodes) == 1
        return n.op == "call_function" and n.target in ELEMENTWISE_FUNCTIONS and len(n.all_input_nodes) == 1

    def run_node(self, n: fx.Node) -> Any:
        t0 = time.perf_counter()
        if self.on_meta and self._keeps_shape(n) and isinstance(self.env.get(n.args[0]), torch.Tensor):
            result = self.env[n.args[0]]
            _record(n, result)
            return result
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


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...], meta_seconds_per_node: float = 0.0) -> None:
    """Shapes into ``node.meta``: on meta (for real for the first ``meta_seconds_per_node``
    times the node count seconds), everything for real when a node has no meta kernel.
    Raises :class:`ShapePropError` naming the node that failed for real."""
    with torch.no_grad():
        try:
            AdaptiveShapeProp(gm, meta_seconds_per_node).propagate(*inputs)
        except _MetaFailed:
            AdaptiveShapeProp(gm, meta=False).propagate(*inputs)
