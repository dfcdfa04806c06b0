"""Tracing pass: ``nn.Module`` -> ``GraphModule`` with shapes in ``node.meta``.

Symbolic tracing with a fallback: when a submodule cannot be traced, the pass retries
with that submodule as a leaf (an opaque ``call_module`` node) and records why. The
dependency analysis freezes every channel a leaf touches, so a fallback can cost
prunability but never correctness. A model whose top level cannot be traced gets a
:class:`TraceError` naming the module and the failing source line.

Example::

    >>> gm = trace(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["tensor_meta"].shape
    torch.Size([1, 64, 32, 32])
"""

from __future__ import annotations

import contextlib
import io
import time
import traceback
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_map

__all__ = ["TraceError", "LeafTracer", "trace"]

#: Key under which the pass stores ``{module path: reason}`` for fallback leaves.
LEAVES_META = "fxprune_leaves"


class TraceError(RuntimeError):
    """Raised when a model cannot be traced even with every failing submodule as a leaf."""


class LeafTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps extra submodules (by qualified name) as leaves and
    remembers the innermost module whose tracing raised."""

    def __init__(self, leaves: dict[str, str] | None = None) -> None:
        super().__init__()
        self.leaves = dict(leaves or {})
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


def _failing_line(exc: BaseException) -> str:
    """The innermost traceback frame outside torch.fx, as ``file:line: code``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/fx/" not in f.filename]
    if not frames:
        return "<unknown line>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    leaves: dict[str, str] = {}
    while True:
        tracer = LeafTracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is handled the same way
            where = tracer.failed_module
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} at {_failing_line(exc)}"
            if not where or where in leaves:
                name = where or type(model).__name__
                raise TraceError(
                    f"cannot trace module '{name}' ({type(model).__name__ if not where else type(model.get_submodule(where)).__name__}): "
                    f"{reason}. Make its forward symbolically traceable (no data-dependent Python control flow), "
                    "or wrap the offending function with torch.fx.wrap."
                ) from exc
            leaves[where] = reason
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        gm.meta[LEAVES_META] = leaves
        return gm


class AdaptiveShapeProp(ShapeProp):
    """``ShapeProp`` that runs nodes for real while that is cheap and finishes on ``meta``.

    A real forward costs its FLOPs; a ``meta`` run costs a roughly fixed amount of Python
    per node (``meta_seconds_per_node``, about 0.3 ms on a 2-core CPU). Nodes run for real
    until the time spent would have paid for a whole meta run; the rest then runs on the
    meta device (values in the environment and the module's tensors are swapped for meta
    tensors). Light models finish for real, heavy ones mostly on meta, and no model costs
    more than about two meta runs. Shapes are the same either way.
    """

    def __init__(self, gm: fx.GraphModule, meta_seconds_per_node: float = 3e-4) -> None:
        super().__init__(gm)
        self.budget = meta_seconds_per_node * len(gm.graph.nodes)
        self.on_meta, self._seconds = False, 0.0

    def run_node(self, n: fx.Node) -> Any:
        if self.on_meta:
            return super().run_node(n)
        t0 = time.perf_counter()
        result = super().run_node(n)
        self._seconds += time.perf_counter() - t0
        if self._seconds > self.budget:
            self._switch_to_meta()
            return tree_map(_to_meta, result)
        return result

    def _switch_to_meta(self) -> None:
        self.on_meta = True
        metas = {k: torch.empty_like(v, device="meta") for k, v in [*self.module.named_parameters(), *self.module.named_buffers()]}
        self._stack.enter_context(_reparametrize_module(self.module, metas))
        self.env = {k: tree_map(_to_meta, v) for k, v in self.env.items()}

    def propagate(self, *args: Any) -> Any:
        with contextlib.ExitStack() as self._stack:
            return super().propagate(*args)


def _to_meta(t: Any) -> Any:
    return t.to("meta") if isinstance(t, torch.Tensor) else t


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    """Shapes into ``node.meta``; a plain real run where the adaptive one fails (an op
    without a meta kernel), which also reports genuinely bad inputs."""
    with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints tracebacks itself
        try:
            AdaptiveShapeProp(gm).propagate(*inputs)
            return
        except Exception:  # noqa: BLE001 - retried for real below, which reports it
            pass
        ShapeProp(gm).propagate(*inputs)


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
        gm = model if isinstance(model, fx.GraphModule) else _symbolic_trace(model)
        gm.meta.setdefault(LEAVES_META, {})
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise ValueError(
                f"{type(model).__name__}.forward takes {len(placeholders)} inputs "
                f"({', '.join(p.target for p in placeholders)}), but {len(example_inputs)} example inputs were given"
            )
        with torch.no_grad():
            try:
                _propagate_shapes(gm, example_inputs)
            except Exception as exc:
                cause = exc.__cause__ or exc
                where = next((line for line in str(exc).splitlines() if line.startswith("While executing")), "")
                raise ValueError(
                    f"running {type(model).__name__} on the example inputs failed: "
                    f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''} "
                    f"({where.replace('While executing ', 'at node ')}). Check the example input shapes."
                ) from exc
    finally:
        model.train(was_training)
    gm.train(was_training)
    return gm
