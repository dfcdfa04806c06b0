"""The mutable state of one analysis walk: spaces, links, bindings, reads, rewrites.

Rules (:mod:`.dispatch`) call its methods; :func:`fxprune.passes.analysis.analyze` turns
the result into a :class:`~fxprune.passes.channel_graph.ChannelGraph`.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
from torch import fx

from ..channel_graph import Binding, Read, Rewrite, Space
from ..op_classes import SIZE_SINK_FUNCTIONS, SIZE_SINK_METHODS, TRAILING_NORM_FUNCTIONS
from ..records import ReadKind, RewriteKind, Role
from ..trace import LEAVES_META
from .nodes import describe, shape

__all__ = ["Builder", "SizeRead", "ShapeOf", "Factorization"]


class SizeRead:
    """What ``x.size(d)`` / ``x.shape[d]`` returned: the size of ``space`` (None: a dim
    without channels)."""

    def __init__(self, tensor: str, dim: int, space: int | None) -> None:
        self.tensor, self.dim, self.space = tensor, dim, space


class ShapeOf:
    """What ``x.shape`` / ``x.size()`` returned: the sizes of ``tensor``, read by index later."""

    def __init__(self, tensor: fx.Node) -> None:
        self.tensor = tensor


class Factorization:
    """Channel dim ``space`` (of node ``node``) viewed as a product of dims: channel ``c``
    is entry ``maps[i][c]`` of factor space ``parts[i]`` (heads x head_dim). ``inner``
    names the factors that only the view made (a head_dim): if the product cannot be
    pruned as one, those are frozen and the rest is tied as a plain block."""

    def __init__(self, node: str, space: int, parts: list[int], maps: list[np.ndarray], inner: set[int]) -> None:
        self.node, self.space, self.parts, self.maps, self.inner = node, space, parts, maps, inner


class Builder:
    """State of one analysis walk over ``gm``.

    ``batch_dims`` gives, per placeholder, the dim that indexes examples (or None).
    """

    def __init__(self, gm: fx.GraphModule, batch_dims: dict[str, int | None]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules(remove_duplicate=False))
        self.leaves: dict[str, str] = gm.meta.get(LEAVES_META, {})
        self.graph = nx.MultiGraph()
        self.spaces: list[Space] = []
        self.bindings: dict[tuple[str, int], Binding] = {}
        self.reads: list[Read] = []
        self.rewrites: list[Rewrite] = []
        self.dims: dict[str, Any] = {}
        #: every name a parameter or buffer is reached under -> its canonical (first) name
        self.canonical: dict[str, str] = {}
        self.tensors: dict[str, Any] = {}
        #: canonical names of buffers (the rest are parameters)
        self.buffers: set[str] = set()
        first: dict[int, str] = {}
        for kind in ("_parameters", "_buffers"):  # named_parameters(remove_duplicate=False), in one walk
            for path, m in self.modules.items():
                for attr, t in getattr(m, kind).items():
                    if t is None:
                        continue
                    name = f"{path}.{attr}" if path else attr
                    self.canonical[name] = first.setdefault(id(t), name)
                    self.tensors[name] = t
                    if kind == "_buffers":
                        self.buffers.add(self.canonical[name])
        self.flops: dict[str, float] = {}
        #: (node, FLOPs per example, spaces) of ops without weights whose size follows channels
        self.op_flops: list[tuple[str, float, tuple[int, ...]]] = []
        #: (layer, output space) of every convolution and linear call the rules understood
        self.layer_outputs: list[tuple[str, int]] = []
        #: convolutions analysed as depthwise (one group per input channel)
        self.depthwise: set[str] = set()
        #: spaces that are batch dimensions
        self.batch: set[int] = set()
        self.batch_size = 1
        #: (size space, reshape output space, reshape node, the rewrite that makes it right if the two differ)
        self.ties: list[tuple[int, int, str, Rewrite | None]] = []
        #: channel dims viewed as products of dims (heads x head_dim), and the head_dim spaces views made
        self.factorizations: list[Factorization] = []
        self.inner: set[int] = set()
        for node in gm.graph.nodes:
            d = batch_dims.get(node.name) if node.op == "placeholder" else None
            if d is not None and shape(node) is not None:
                s = self.new(node, d, shape(node)[d], f"the batch dimension of input '{node.name}'")
                self.spaces[s].batch = True
                self.batch.add(s)
                self.dims[node.name] = {d: s}
                if len(self.batch) == 1:
                    self.batch_size = shape(node)[d]

    # -- spaces
    def new(self, node: fx.Node, dim: int, size: int, frozen: str | None = None) -> int:
        s = Space(len(self.spaces), node.name, dim, size, frozen)
        self.spaces.append(s)
        self.graph.add_node(s.id)
        return s.id

    def dims_of(self, x: Any) -> dict[int, int]:
        d = self.dims.get(x.name) if isinstance(x, fx.Node) else None
        return d if isinstance(d, dict) else {}

    def tensor_dims(self, x: Any) -> dict[int, int]:
        """:meth:`dims_of`, where a parameter or buffer read directly (``get_attr``) first
        gets a carrier space for each of its dims of size > 1: a layer scale reshaped to
        ``[1, C, 1, 1]`` or a class token expanded over the batch carries its channels."""
        if isinstance(x, fx.Node) and x.op == "get_attr" and shape(x) is not None:
            for d, n in enumerate(shape(x)):
                if n > 1:
                    self.space(x, d)
        return self.dims_of(x)

    def batch_dim(self, x: Any) -> int | None:
        """The dim of ``x`` that indexes examples, if the analysis followed it to ``x``."""
        return next((d for d, s in self.dims_of(x).items() if s in self.batch), None)

    def space(self, x: fx.Node, dim: int) -> int:
        """The space of ``x`` on ``dim``; created on first use for untracked tensors
        (a parameter becomes a carrier, anything else is frozen)."""
        dims = self.dims.setdefault(x.name, {})
        if dim in dims:
            return dims[dim]
        size = shape(x)[dim]
        if x.op == "get_attr":
            s = self.new(x, dim, size)
            self.bind(x.target, dim, s, "carrier", x.target)
        elif x.op == "placeholder":
            s = self.new(x, dim, size, f"graph input '{x.name}'")
        else:
            s = self.new(x, dim, size, f"channels come from '{x.name}' ({describe(self, x)}), which the analysis does not track")
        dims[dim] = s
        return s

    def link(self, a: int, b: int, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Tie index ``pairs[0][k]`` of space ``a`` to ``pairs[1][k]`` of ``b`` (identity if None)."""
        if pairs is None and self.spaces[a].size != self.spaces[b].size:
            raise AssertionError(f"identity link between spaces of sizes {self.spaces[a].size} and {self.spaces[b].size}")
        self.graph.add_edge(a, b, pairs=pairs, src=a)

    def factor(self, node: fx.Node, space: int, parts: list[int], maps: list[np.ndarray]) -> None:
        """Channel ``c`` of ``space`` is entry ``maps[i][c]`` of ``parts[i]``: resolved once
        the groups are known (:func:`.groups.resolve_products`)."""
        self.factorizations.append(Factorization(node.name, space, parts, maps, {p for p in parts if p in self.inner}))

    def freeze(self, s: int, reason: str) -> None:
        if self.spaces[s].frozen is None:
            self.spaces[s].frozen = reason

    # -- roles
    def param(self, target: str):
        return self.tensors[target]

    def bind(self, target: str, dim: int, space: int, role: Role, owner: str, period: int | None = None) -> None:
        """Parameter ``target``'s dim ``dim`` is indexed by ``space``. A tensor reached
        under several names (tied weights, a shared module) is bound once: its other
        uses tie their spaces to the first one's."""
        name = self.canonical.get(target, target)
        key = (name, dim)
        if key in self.bindings:
            first = self.bindings[key]
            if first.period != period:
                self.freeze(space, f"'{target}' is tied to '{first.owner}' with another grouping")
                self.freeze(first.space, f"'{target}' is tied to '{owner}' with another grouping")
            self.link(first.space, space)
            return
        self.bindings[key] = Binding(name, dim, space, role, owner, period)

    def add_flops(self, target: str, flops: float) -> None:
        """Each entry of weight ``target`` costs ``flops`` more per example."""
        name = self.canonical.get(target, target)
        self.flops[name] = self.flops.get(name, 0.0) + flops

    def read(self, node: fx.Node, argpos: int, space: int, dim: int, kind: ReadKind = "mask") -> None:
        self.reads.append(Read(node.name, argpos, space, dim, self.batch_dim(node.args[argpos]), kind))

    def rewrite(self, node: fx.Node, kind: RewriteKind, pos: int, spaces: tuple[int, ...]) -> None:
        self.rewrites.append(Rewrite(node.name, kind, pos, spaces))

    # -- sizes read as Python ints
    def size_read(self, node: fx.Node, x: Any, d: Any) -> SizeRead | dict:
        """``x.size(d)`` / ``x.shape[d]``: remember which space the number is the size of.
        A channel count read as a number is only safe where it feeds the sizes of a
        view/reshape/expand/unflatten or the normalised shape of a LayerNorm / RMSNorm
        (checked there); any other use freezes it."""
        if not isinstance(d, int) or shape(x) is None:
            return {}
        d = d + len(shape(x)) if d < 0 else d
        space = self.dims_of(x).get(d)
        if space is not None and space not in self.batch:
            bad = [u for u in node.users if not _is_size_sink(u)]
            if bad:
                self.freeze(space, f"the size of channel dim {d} of '{x.name}' is used by '{bad[0].name}'")
        return SizeRead(x.name, d, space)

    def size_info(self, v: Any) -> SizeRead | None:
        return self.dims.get(v.name) if isinstance(v, fx.Node) and isinstance(self.dims.get(v.name), SizeRead) else None


def _is_size_sink(u: fx.Node) -> bool:
    return (u.op == "call_method" and u.target in SIZE_SINK_METHODS) or (
        u.op == "call_function" and u.target in SIZE_SINK_FUNCTIONS | TRAILING_NORM_FUNCTIONS)
