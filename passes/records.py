"""The records of the channel-graph contract (:mod:`.channel_graph`): a channel space, a
parameter, a binding of a parameter dim to a space, a read, a rewrite, a group, a
residual branch and the FLOPs of an op without weights. Kinds are ``Literal`` types,
checked where a record is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

__all__ = ["Role", "ReadKind", "RewriteKind", "Space", "Param", "Binding", "Read", "Rewrite", "Group", "Branch",
           "OpFlops"]


Role = Literal["producer", "consumer", "carrier"]
ReadKind = Literal["mask", "norm"]
RewriteKind = Literal["sizes", "slice", "split", "norm", "scale"]


def _check_kind(made: object, field_name: str, kinds: object) -> None:
    """A kind is checked where it is made: a misspelt one is an error here, not a silent no-op downstream."""
    value, allowed = getattr(made, field_name), get_args(kinds)
    if value not in allowed:
        raise ValueError(f"{type(made).__name__}.{field_name} {value!r} is not one of {allowed}")


@dataclass
class Space:
    """One channel-carrying dimension of one node's output (``batch``: the batch dimension,
    followed by the same rules and always frozen)."""

    id: int
    node: str
    dim: int
    size: int
    frozen: str | None = None
    group: int = -1
    batch: bool = False


@dataclass(frozen=True)
class Param:
    """A parameter or buffer, by identity: a tensor reached under several names (tied
    weights, a shared module) is one ``Param`` with all its ``names``; ``name`` is the
    first of them in module order.

    ``flops`` is the forward FLOPs per example each entry costs (two per multiply-add
    of a convolution or linear weight, summed over every call; 0 for biases and norm
    affines); ``branches`` are the residual branches whose removal deletes the tensor
    (every node that reaches it lies inside them); ``used`` is False for a tensor no node
    the output depends on reaches (compaction deletes it)."""

    name: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    buffer: bool
    flops: float = 0.0
    branches: tuple[int, ...] = ()
    used: bool = True

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass(frozen=True)
class Binding:
    """A parameter dimension indexed by a channel space. ``param`` is a canonical name
    (:attr:`Param.name`). ``period`` is set for the input dimension of a grouped
    convolution, whose weight is indexed by ``channel % period``."""

    param: str
    dim: int
    space: int
    role: Role
    owner: str
    period: int | None = None

    def __post_init__(self) -> None:
        _check_kind(self, "role", Role)


@dataclass(frozen=True)
class Read:
    """A consumer that mixes the channels of ``space``: ``node.args[arg]`` reads them on
    dimension ``dim``; ``batch_dim`` is that tensor's batch dimension (``None`` where
    the analysis lost track of it, e.g. after a reshape merging batch and sequence).
    Unit gates are applied here, so a gate at 0 means exactly "channel absent".

    ``kind`` says how: ``"mask"`` multiplies the channels by their gates; ``"norm"`` is a
    normalisation (LayerNorm, RMSNorm) over ``dim`` whose statistics count only the
    channels whose gate is on, so the gated model computes what the compact one, with the
    plain norm over the kept width, computes."""

    node: str
    arg: int
    space: int
    dim: int
    batch_dim: int | None = 0
    kind: ReadKind = "mask"

    def __post_init__(self) -> None:
        _check_kind(self, "kind", ReadKind)


@dataclass(frozen=True)
class Rewrite:
    """A constant in ``node``'s arguments that must follow the kept size of spaces.

    kinds: ``sizes`` (entry ``pos`` of the sizes a view/reshape/expand/unflatten is
    given is the size of ``spaces[0]``), ``slice`` (getitem bounds at index position
    ``pos`` of input space ``spaces[0]``), ``split`` (split/chunk along dim ``pos`` into
    ``spaces``, the outputs' spaces), ``norm`` (the normalised shape of a LayerNorm or
    RMSNorm over ``spaces[0]``: argument ``pos`` of the function, or the module's
    ``normalized_shape``), ``scale`` (attention whose head_dim is ``spaces[0]`` is given
    the dense default scale ``pos ** -0.5``)."""

    node: str
    kind: RewriteKind
    pos: int
    spaces: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_kind(self, "kind", RewriteKind)


@dataclass
class Group:
    """A connected component of tied spaces: one unit gate vector of length ``num_units``.
    ``per_example`` is False when some read of the group has no batch dimension: its
    gate then samples one mask per batch instead of one per example."""

    id: int
    spaces: list[int]
    num_units: int
    unit_index: dict[int, np.ndarray]
    frozen: list[str] = field(default_factory=list)
    per_example: bool = True
    #: a *product* group (a channel dim viewed into heads x head_dim): no gate of its own;
    #: unit ``u`` is kept when every factor keeps it: group ``factors[0][u, f]`` keeps its
    #: unit ``factors[1][u, f]``. None for a group with its own gate.
    factors: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def prunable(self) -> bool:
        return not self.frozen

    @property
    def derived(self) -> bool:
        """A product group: its units are removed through its factor groups' gates."""
        return self.factors is not None

    def factor_ids(self) -> list[list[int]]:
        """Per factor (heads, head_dim), the ids of the groups it comes from, first seen
        first (a packed q/k/v projection's head_dim may come from two); [] for a group with
        its own gate."""
        return [list(dict.fromkeys(col.tolist())) for col in self.factors[0].T] if self.derived else []

    def segments(self) -> list[np.ndarray]:
        """The distinct unit sets of the group's spaces (each must keep one unit)."""
        seen = {tuple(np.unique(u)) for u in self.unit_index.values() if len(u)}
        return [np.asarray(s, dtype=np.int64) for s in sorted(seen)]


@dataclass(frozen=True)
class Branch:
    """A residual branch ``add(stream, out)`` where ``out = F(x)`` and ``stream`` is ``x``
    or a shortcut of it; removing the ``nodes`` of F turns the add into ``stream``.
    ``params`` are the tensors only F reaches (canonical names), ``batch_dim`` the batch
    dimension of ``out``."""

    id: int
    add: str
    stream: str
    out: str
    nodes: frozenset[str]
    params: tuple[str, ...] = ()
    batch_dim: int | None = 0


@dataclass(frozen=True)
class OpFlops:
    """The FLOPs of an op without weights whose size follows channel spaces (attention's
    ``q @ k^T`` over heads and head_dim, ``attn @ v``): ``per_entry`` FLOPs per example
    for every combination of the channels of ``spaces``; ``branches`` are the residual
    branches it lies in."""

    node: str
    per_entry: float
    spaces: tuple[int, ...]
    branches: tuple[int, ...] = ()
