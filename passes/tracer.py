"""The symbolic tracer: ``torch.fx`` tracing in one pass, with a leaf where a submodule
cannot be traced, and custom ``torch.autograd.Function`` calls kept whole.

* A submodule whose tracing raises becomes a leaf (an opaque ``call_module`` node) in the
  same trace: the nodes its failed attempt created are dropped and tracing goes on.
* ``MyFunction.apply(x)`` is recorded as one ``call_function`` node that calls it: its
  forward is not inlined, so its own backward is what autograd runs. While a trace runs,
  ``torch.autograd.Function.apply`` is wrapped (as ``torch.fx`` wraps
  ``nn.Module.__call__`` while it traces); it is restored when the trace ends.

Example::

    >>> class Odd(nn.Module):
    ...     def forward(self, x):
    ...         return x if x.sum() > 0 else -x      # control flow on a value
    >>> tracer = LeafTracer()
    >>> graph = tracer.trace(nn.Sequential(nn.Linear(4, 4), Odd()))
    >>> tracer.leaves
    {'1': 'TraceError: symbolically traced variables cannot be used as inputs to control flow at ...'}
"""

from __future__ import annotations

import contextlib
import inspect
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from .errors import exception_line
from .rules import is_registered_module

__all__ = ["TraceError", "LeafTracer", "LEAVES_META", "reason", "autograd_function_of", "as_call"]

#: Key under which tracing stores ``{module path: reason}`` for fallback leaves.
LEAVES_META = "fxprune_leaves"

#: attribute marking the wrapper that calls a custom autograd.Function
_FUNCTION_ATTR = "_fxprune_autograd_function"


class TraceError(RuntimeError):
    """Raised when a model cannot be traced even with every failing submodule as a leaf."""


def as_call(model: nn.Module, values: list[Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` that call ``model`` with ``values``, its forward's arguments in
    parameter order: by keyword, as transformers' models expect (their decorators pass
    some arguments on again), or positionally for a forward that takes ``*args``."""
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    if any(p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) for p in params):
        return tuple(values), {}
    return (), {p.name: v for p, v in zip(params, values)}


def _failing_line(exc: BaseException) -> str:
    """The innermost traceback frame outside torch.fx, as ``file:line: code``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/fx/" not in f.filename]
    if not frames:
        return "<unknown line>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def reason(exc: BaseException) -> str:
    """One line: the exception and the user-code line that raised it."""
    return f"{exception_line(exc)} at {_failing_line(exc)}"


def _caller(cls: type) -> Any:
    """A function that calls ``cls.apply`` (the node's target; it names the class)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return cls.apply(*args, **kwargs)  # type: ignore[attr-defined]  # an autograd.Function subclass

    call.__name__ = call.__qualname__ = f"{cls.__name__}_apply"
    setattr(call, _FUNCTION_ATTR, cls)
    return call


def autograd_function_of(target: Any) -> type | None:
    """The custom autograd.Function a ``call_function`` target calls, if it is one."""
    return getattr(target, _FUNCTION_ATTR, None)


@contextlib.contextmanager
def _opaque_autograd_functions(tracer: fx.Tracer):
    """While tracing, ``SomeFunction.apply(proxy, ...)`` becomes one node."""
    raw = torch.autograd.Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
            return tracer.create_proxy("call_function", _caller(cls), args, kwargs)
        return raw.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = raw


class LeafTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps a submodule whose tracing raises as a leaf, in the
    same trace (``leaves`` maps each such module's path to the reason), and records
    custom autograd.Function calls as single nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.leaves: dict[str, str] = {}

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with _opaque_autograd_functions(self):
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaves or is_registered_module(m)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        if not path or self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        last = next(iter(reversed(self.graph.nodes)), None)  # nodes are appended after it
        depth = len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            self.leaves[path] = reason(exc)
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
