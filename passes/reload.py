"""Graphs that return a model's own output type, and that ``torch.load`` can rebuild.

* :class:`TypedOutput`: a model returning a ``dict`` subclass (transformers'
  ``ModelOutput``) gets the same type back from its graph, while every pass reads the
  graph's output as a plain dict of tensors. The generated code ends in
  ``return typed_output('module:Cls', {...})``; copies of the graph keep it (``Graph.set_codegen``).
* :class:`ReloadTracer`: ``torch.save`` pickles a GraphModule as its code, and
  ``torch.load`` traces that code again with the module's ``_tracer_cls``. The default
  tracer hands buffers to the code as real tensors, so ``position_ids[:, :n]`` with a
  traced ``n`` fails (transformers' BERT); this one traces buffers as the graph did
  (``get_attr``) and turns ``typed_output`` back into a typed output.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from torch import fx, nn

__all__ = ["TypedOutput", "typed_output", "ReloadTracer"]


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


@functools.cache
def _resolve(name: str) -> Any:
    module, _, qualname = name.partition(":")
    return functools.reduce(getattr, qualname.split("."), importlib.import_module(module))


def typed_output(cls: str, values: dict[str, Any]) -> Any:
    """``cls(**values)``, ``cls`` named ``"module:qualname"``: the graph's output dict as the
    model's own output type."""
    return _resolve(cls)(**values)


class TypedOutput(fx.graph.CodeGen):
    """Code generation returning the graph's output dict as ``cls(**output)``."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [("typed_output", typed_output)]

    def generate_output(self, output_args: Any, *, descs: Any = None, repr_fn: Any = None) -> str:
        return f"return typed_output({_qualified(self.cls)!r}, {(repr_fn or repr)(output_args)})"


class ReloadTracer(fx.Tracer):
    """The tracer ``torch.load`` rebuilds fxprune's graphs with (see the module's docstring)."""

    proxy_buffer_attributes = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("autowrap_functions", (typed_output,))
        super().__init__(*args, **kwargs)

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        graph = super().trace(root, concrete_args)
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        typed = out.args[0]
        if isinstance(typed, fx.Node) and typed.op == "call_function" and typed.target is typed_output:
            cls, values = typed.args
            out.args = (values,)
            graph.erase_node(typed)
            graph.set_codegen(TypedOutput(_resolve(cls)))
        return graph
