"""Where a view, reshape, expand or unflatten node keeps the sizes it is given.

The analysis reads them (a literal channel count becomes a rewrite, a size read from a
tensor is checked against the reshaped tensor), and compaction writes them; both go
through :func:`sizes_of` and :func:`set_sizes`, so the argument layouts of
``x.view(*sizes)``, ``x.view(sizes)``, ``torch.reshape(x, shape)``, ``x.expand(...)``,
``x.unflatten(dim, sizes)``, ``torch.unflatten(x, dim, sizes)`` and ``nn.Unflatten``
are spelled out once.

Example::

    >>> gm = fx.symbolic_trace(lambda x: x.view(x.shape[0], 4, -1))
    >>> node = next(n for n in gm.graph.nodes if n.target == "view")
    >>> sizes_of(node, dict(gm.named_modules()))
    Sizes(values=[getitem, 4, -1], first_dim=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Sizes", "sizes_of", "set_sizes"]

_FROM_ZERO = ("view", "reshape", "expand")


@dataclass
class Sizes:
    """``values[k]`` is the size given for output dim ``first_dim + k``."""

    values: list[Any]
    first_dim: int


def _unflattened(d: int, node: fx.Node, n_sizes: int) -> int:
    """The output dim the first of ``n_sizes`` sizes lands on when ``node`` unflattens
    input dim ``d`` (a negative ``d`` counts from the end of the input, which has
    ``n_sizes - 1`` dims fewer than the output)."""
    tm = node.meta.get("tensor_meta")
    return d + len(tm.shape) - (n_sizes - 1) if d < 0 and tm is not None else d


def sizes_of(node: fx.Node, modules: dict[str, nn.Module]) -> Sizes | None:
    """The sizes ``node`` is given, or ``None`` when it takes none (flatten, squeeze)."""
    if node.op == "call_method" and node.target in _FROM_ZERO:
        rest = list(node.args[1:]) or [node.kwargs.get("size", node.kwargs.get("shape"))]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            rest = list(rest[0])
        return Sizes(rest, 0)
    if node.op == "call_function" and node.target is torch.reshape:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs["shape"]
        return Sizes(list(shape), 0)
    if (node.op == "call_method" and node.target == "unflatten") or (
            node.op == "call_function" and node.target is torch.unflatten):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        sizes = node.args[2] if len(node.args) > 2 else node.kwargs["sizes"]
        return Sizes(list(sizes), _unflattened(dim, node, len(sizes)))
    if node.op == "call_module" and isinstance(modules.get(node.target), nn.Unflatten):
        m = modules[node.target]
        return Sizes(list(m.unflattened_size), _unflattened(m.dim, node, len(m.unflattened_size)))
    return None


def set_sizes(node: fx.Node, modules: dict[str, nn.Module], values: list[Any]) -> None:
    """Give ``node`` the sizes ``values`` (same layout as :func:`sizes_of` returned).
    An ``nn.Unflatten`` call becomes a ``torch.unflatten`` call, so the module (maybe
    shared) is left as it was."""
    current = sizes_of(node, modules)
    if current is None:
        raise ValueError(f"'{node.name}' ({node.op} {node.target}) takes no sizes")
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if node.op == "call_method" and node.target in _FROM_ZERO:
        node.args, node.kwargs = (x, *values), {}
    elif node.op == "call_function" and node.target is torch.reshape:
        node.args, node.kwargs = (x, tuple(values)), {}
    else:  # unflatten in any spelling
        node.op, node.target = "call_function", torch.unflatten
        node.args, node.kwargs = (x, current.first_dim, tuple(values)), {}
