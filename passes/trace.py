"""Tracing pass: ``nn.Module`` -> ``GraphModule`` with shapes in ``node.meta``.

Symbolic tracing in one pass: when a submodule cannot be traced, the tracer records it
as a leaf (an opaque ``call_module`` node), drops the nodes its failed attempt created,
and goes on with the rest of the model. The dependency analysis freezes every channel a
leaf touches, so a fallback can cost prunability but never correctness; a leaf that
also fails when run for real (a bug in the module, not an untraceable one) is reported by
shape propagation with its error. A model whose top level cannot be traced gets a
:class:`TraceError` naming the module and the failing source line.

Example::

    >>> gm = trace(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["tensor_meta"].shape
    torch.Size([1, 64, 32, 32])
"""

from __future__ import annotations

import copy
import traceback
from typing import Any

import torch
from torch import fx, nn

from .shape_prop import ShapePropError, propagate_shapes

__all__ = ["TraceError", "LeafTracer", "trace", "LEAVES_META"]

#: Key under which the pass stores ``{module path: reason}`` for fallback leaves.
LEAVES_META = "fxprune_leaves"


class TraceError(RuntimeError):
    """Raised when a model cannot be traced even with every failing submodule as a leaf."""


def _failing_line(exc: BaseException) -> str:
    """The innermost traceback frame outside torch.fx, as ``file:line: code``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/fx/" not in f.filename]
    if not frames:
        return "<unknown line>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} at {_failing_line(exc)}"


class LeafTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps a submodule whose tracing raises as a leaf, in the
    same trace; ``leaves`` maps each such module's path to the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.leaves: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        if not path or self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        last = next(iter(reversed(self.graph.nodes)), None)  # nodes are appended after it
        depth = len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the module is kept whole and run for real by shape propagation
            self.leaves[path] = _reason(exc)
        for key in list(self.module_stack.keys())[depth:]:  # the failed call left its scope open
            self.module_stack.pop(key)
        created = []
        for node in reversed(self.graph.nodes):
            if node is last:
                break
            created.append(node)
        for node in created:  # newest first, so users go before what they use
            if not node.users:
                self.graph.erase_node(node)
        return super().call_module(m, forward, args, kwargs)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = LeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise TraceError(
            f"cannot trace module '{type(model).__name__}': {_reason(exc)}. Make its forward symbolically traceable "
            "(no data-dependent Python control flow), or wrap the offending function with torch.fx.wrap."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[LEAVES_META] = tracer.leaves
    return gm


def trace(model: nn.Module, example_inputs: tuple[Any, ...] | torch.Tensor) -> fx.GraphModule:
    """Trace ``model`` in eval mode and propagate shapes with ``example_inputs``.

    Returns a ``GraphModule`` whose tensor nodes carry ``meta["tensor_meta"]``; fallback
    leaves are listed in ``gm.meta["fxprune_leaves"]``. The model's training flag is
    restored afterwards, and the returned module is in the same mode.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxprune.trace expects an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, fx.GraphModule):  # already traced: a new graph, so the caller's is not changed
            gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
            gm.meta.update({k: v for k, v in model.meta.items() if k == LEAVES_META})
        else:
            gm = _symbolic_trace(model)
        gm.meta.setdefault(LEAVES_META, {})
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise ValueError(
                f"{type(model).__name__}.forward takes {len(placeholders)} inputs "
                f"({', '.join(p.target for p in placeholders)}), but {len(example_inputs)} example inputs were given"
            )
        try:
            propagate_shapes(gm, tuple(example_inputs))
        except ShapePropError as exc:
            node = exc.node
            where = f"module '{node.target}'" if node.op == "call_module" else f"node '{node.name}'"
            leaf = gm.meta[LEAVES_META].get(node.target) if node.op == "call_module" else None
            hint = (f"; it could not be traced either ({leaf})" if leaf else
                    ". Check the example input shapes against what the model expects")
            raise ValueError(
                f"running {type(model).__name__} on the example inputs failed at {where}: "
                f"{type(exc.cause).__name__}: {str(exc.cause).splitlines()[0] if str(exc.cause) else ''}{hint}"
            ) from exc
    finally:
        model.train(was_training)
    gm.train(was_training)
    return gm
