"""What the analysis reads off one fx node: its arguments, its output shape (from shape
propagation), its tensor arguments, and a readable name for messages. The builder and
the rules share these; nothing here knows the builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import fx, nn

__all__ = ["arg", "shape", "is_tensor", "tensor_args", "describe", "norm_dim", "HasModules"]


class HasModules(Protocol):
    """What :func:`describe` reads: the model's submodules by qualified name."""

    modules: Mapping[str, nn.Module]


# ----------------------------------------------------------------------------- helpers
def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def shape(x: Any) -> tuple[int, ...] | None:
    tm = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def is_tensor(x: Any) -> bool:
    return shape(x) is not None


def tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if is_tensor(a) else None)
    return out


def describe(b: HasModules, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(b.modules[node.target]).__name__} module '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return str(getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", node.target))


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d
