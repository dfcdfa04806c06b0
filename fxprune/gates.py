"""Gate modules: all thetas in one flat buffer, one mask per forward, applied where
consumers read a channel group and where a residual branch joins its stream.

The :class:`GateBank` holds every theta (unit gates of every group, then layer gates) in
one buffer. In training mode it samples one ``xi ~ Bern(theta)`` per example and
structure in a single call and returns the straight-through mask
``xi + theta - theta.detach()``; in eval mode it returns ``1[theta >= 0.5]`` with the
best unit of any channel dimension that would be empty kept. While theta is exactly 0
or 1 (fixed masks), both modes give the same mask.

The ``"balanced"`` estimator (method.md section 4) keeps the forward and weights each
example's backward by ``xi / (2 theta) + (1 - xi) / (2 (1 - theta))``: the derivative with
the structure on and with it off count equally, a trapezoid estimate of
``loss(on) - loss(off)`` whose mean does not depend on the gate's own theta.

:class:`GateRead` multiplies the channels of a tensor by their units' mask entries,
with the batch on the tensor's own batch dim; :class:`GateNorm` is a LayerNorm / RMSNorm
whose statistics count only the channels whose gate is on; :class:`LayerGateApply`
scales a branch output by its layer gate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .passes.channel_graph import ChannelGraph
from .passes.units import floor_keep, segment_matrix

__all__ = ["GateBank", "GateRead", "GateNorm", "LayerGateApply", "GATE_MODULES", "ESTIMATORS", "bank_structure", "group_floors", "read_index", "factor_slots"]

#: the theta gradient estimators a gate can use
ESTIMATORS = ("straight_through", "balanced")


class GateBank(nn.Module):
    """``theta`` for ``n`` structures; ``forward(ref)`` returns every mask for ``ref``'s batch.

    The mask is ``[n]`` in eval mode and ``[batch, n]`` in training mode, the batch size
    read from ``ref.shape[batch_dim]`` (1 when ``batch_dim`` is None). Entries where
    ``per_example`` is False use the first example's sample for the whole batch (their
    group has a read without a batch dim). ``segments`` ([k, width], flat indices padded
    with -1) are the unit sets that must each keep ``least`` units (one per segment, at
    least one): ``floors`` (group id -> units, fixed at prepare from the groups' widths
    then and ``PruneConfig.min_share`` / ``min_units``, :func:`group_floors`).

    ``theta`` is a buffer, not a parameter: the pruner updates it with projected SGD,
    never the user's optimizer, and it is saved in the state dict.
    """

    _is_impure = True  # dead-code elimination must keep the mask source

    def __init__(self, n: int, theta_init: float = 1.0, estimator: str = "straight_through",
                 batch_dim: int | None = 0) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator, self.batch_dim = estimator, batch_dim
        #: group id -> the units it keeps at least (its floor, set at prepare; other groups: one)
        self.floors: dict[int, int] = {}
        #: classes of groups playing one role in repeated blocks (set at prepare, :func:`fxprune.shaping.role_classes`)
        self.roles: list[list[int]] = []
        #: the generator masks are sampled with (None: torch's default; set per process under torch.distributed)
        self.generator: torch.Generator | None = None
        self.theta: Tensor
        self.register_buffer("theta", torch.full((n,), float(theta_init)))
        self.set_structure(torch.zeros(0, 0, dtype=torch.long), torch.ones(n, dtype=torch.bool),
                           torch.zeros(0, dtype=torch.long))

    def set_structure(self, segments: Tensor, per_example: Tensor, least: Tensor) -> None:
        """The never-empty unit sets, the units each keeps at least, and the per-example
        flags (after building or removal)."""
        device = self.theta.device
        self.register_buffer("segments", segments.to(device), persistent=False)
        self.register_buffer("least", least.to(device), persistent=False)
        self.register_buffer("per_example", per_example.to(device), persistent=False)
        self._all_per_example = bool(per_example.all())

    def _apply(self, fn, recurse=True):
        """Moves (``.to()``, ``.cuda()``, ``.half()``) take theta to the new device only:
        it stays float32 (a theta step of 1e-4 is lost in fp16) and a leaf that keeps
        learning (converting a leaf that requires grad makes a non-leaf)."""
        theta = self.theta
        super()._apply(fn, recurse)
        self.theta = theta.detach().to(self.segments.device).requires_grad_(theta.requires_grad)
        return self

    def deterministic(self, level: float | Tensor = 0.5) -> Tensor:
        """``1[theta >= level]`` (what eval mode keeps at the default 0.5), plus the best
        units of any segment that would keep fewer than its floor (``least``; at least one:
        no channel dimension becomes empty)."""
        theta = self.theta.detach()
        return floor_keep(theta >= level, theta, self.segments, self.least).to(theta.dtype)

    def forward(self, ref: Tensor) -> Tensor:
        theta = self.theta
        if not self.training:
            return self.deterministic()
        batch = ref.shape[self.batch_dim] if self.batch_dim is not None else 1
        t = theta.detach().expand(batch, -1)
        xi = torch.bernoulli(t) if self.generator is None else torch.bernoulli(t, generator=self.generator)
        if not self._all_per_example:
            xi = torch.where(self.per_example, xi, xi[:1])
        if self.estimator == "straight_through":
            return xi + theta - theta.detach()
        weight = xi / (2 * t.clamp_min(1e-3)) + (1 - xi) / (2 * (1 - t).clamp_min(1e-3))
        return xi + (theta - theta.detach()) * weight

    def extra_repr(self) -> str:
        return f"n={self.theta.numel()}, estimator={self.estimator}, batch_dim={self.batch_dim}"


class GateRead(nn.Module):
    """Multiplies the channels of ``x`` on ``dim`` by their mask entries.

    ``index[c]`` is the flat mask entry of channel ``c`` (``index[f, c]`` for a product
    group: the entry of its factor ``f``; the channel's mask is their product); a ``[batch, n]`` mask is laid
    on ``batch_dim`` (its first row is used when the tensor has no batch dim). ``group``
    and ``space`` name the analysis entities the read belongs to, so the index can be
    refreshed after live removal.
    """

    def __init__(self, index: np.ndarray, dim: int, batch_dim: int | None, group: int, space: int) -> None:
        super().__init__()
        self.dim, self.batch_dim, self.group, self.space = dim, batch_dim, group, space
        self.set_index(index)

    def set_index(self, index: np.ndarray) -> None:
        device = self.index.device if hasattr(self, "index") else None
        # contiguous: a transposed [factors, channels] index is refused by safetensors (transformers' Trainer saves)
        self.register_buffer("index", torch.as_tensor(np.ascontiguousarray(index), dtype=torch.long, device=device))

    def channel_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """The mask entries of ``x``'s channels, shaped to broadcast against ``x`` (for a
        product group, ``index`` is ``[factors, channels]`` and the entries multiply)."""
        if self.index.dim() == 1:
            m = mask.index_select(-1, self.index)
        else:
            m = mask.index_select(-1, self.index.flatten()).unflatten(-1, tuple(self.index.shape)).prod(-2)
        shape = [1] * x.dim()
        shape[self.dim] = m.shape[-1]
        if m.dim() == 2:
            if self.batch_dim is None:
                m = m[0]
            else:
                if self.batch_dim > self.dim:
                    m = m.t()
                shape[self.batch_dim] = m.shape[0] if self.batch_dim < self.dim else m.shape[1]
        return m.reshape(shape)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return x * self.channel_mask(x, mask).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, batch_dim={self.batch_dim}, group={self.group}"


class GateNorm(GateRead):
    """A LayerNorm (``kind="layer"``) or RMSNorm (``"rms"``) over ``dim``, or a GroupNorm
    (``"group"``, ``groups`` groups over dim 1, statistics per group), whose statistics
    count only the channels whose gate is on: with ``m`` the channels' mask entries and
    ``n = sum(m)``, ``mean = sum(m x) / n``, ``var = sum(m (x - mean)^2) / n`` (RMSNorm:
    ``sum(m x^2) / n``). With a 0/1 mask this is exactly the plain norm over the kept
    channels, which is what the compact model computes; the channels whose gate is off
    get the plain formula's values and are masked where they are read. It is computed in
    float32 (as autocast runs ``layer_norm``) and returned in ``x``'s dtype, or float32
    under autocast. An example whose channels are all off gets zeros."""

    def __init__(self, index: np.ndarray, dim: int, batch_dim: int | None, group: int, space: int, kind: str,
                 eps: float | None, groups: int | None = None) -> None:
        super().__init__(index, dim, batch_dim, group, space)
        self.kind, self.eps, self.groups = kind, eps, groups

    def forward(self, x: Tensor, mask: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                normalized_shape: object = None) -> Tensor:  # the plain call's argument, unused: the dim is ``dim``
        m, xs, over = self.channel_mask(x, mask).float(), x.float(), self.dim
        if self.kind == "group":  # statistics per example and group, over its channels and every position
            m = m.expand(m.shape[0], *x.shape[1:]).reshape(m.shape[0], self.groups, -1)
            xs, over = xs.reshape(x.shape[0], self.groups, -1), -1
        n = m.sum(over, keepdim=True)
        nz = n.clamp_min(1.0)
        if self.kind != "rms":
            xs = xs - (m * xs).sum(over, keepdim=True) / nz
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = (xs * torch.rsqrt((m * xs * xs).sum(over, keepdim=True) / nz + eps) * (n > 0)).reshape(x.shape)
        affine = [1] * x.dim()
        affine[self.dim] = -1
        if weight is not None:
            y = y * weight.float().reshape(affine)
        if bias is not None:
            y = y + bias.float().reshape(affine)
        return y.to(torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, dim={self.dim}, eps={self.eps}, batch_dim={self.batch_dim}, group={self.group}"


class LayerGateApply(nn.Module):
    """Scales a residual branch output by its layer gate, mask entry ``index``."""

    def __init__(self, index: int, batch_dim: int | None, branch: int) -> None:
        super().__init__()
        self.index, self.batch_dim, self.branch = index, batch_dim, branch

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask[..., self.index]
        shape = [1] * x.dim()
        if m.dim() == 1:
            if self.batch_dim is None:
                m = m[0]
            else:
                shape[self.batch_dim] = m.shape[0]
        return x * m.reshape(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"index={self.index}, batch_dim={self.batch_dim}, branch={self.branch}"


#: the modules gate insertion adds to a model
GATE_MODULES = (GateBank, GateRead, GateNorm, LayerGateApply)


def group_floors(cg: ChannelGraph, groups: list[int], share: float, min_units: int) -> dict[int, int]:
    """The floor of every gated group (id -> units): ``share`` of its units rounded up, at
    least ``min_units``, at most all of them. Fixed when the gates are built, so a floor
    does not fall as removals narrow its group."""
    return {g: min(cg.groups[g].num_units, max(min_units, math.ceil(share * cg.groups[g].num_units - 1e-9)))
            for g in groups}


def bank_structure(cg: ChannelGraph, units: dict[int, slice], size: int,
                   floors: dict[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """The bank's ``segments`` (every gated group's unit sets, as flat indices), the
    per-example flags, and each segment's floor (its group's in ``floors``, at least one),
    for the gated groups at ``units`` (group id -> flat slice)."""
    segments, least = [], []
    for g in units:
        for seg in cg.groups[g].segments():
            segments.append(seg + units[g].start)
            least.append(max(1, floors.get(g, 1)))
    per_example = torch.ones(size, dtype=torch.bool)
    for g, sl in units.items():
        if not cg.groups[g].per_example:
            per_example[sl] = False
    return segment_matrix(segments), per_example, torch.tensor(least, dtype=torch.long)


def factor_slots(cg: ChannelGraph, units: dict[int, slice], group: int) -> np.ndarray | None:
    """For a product group whose factor groups are all gated: ``[units, factors]``, the
    flat entry of each unit's factor units (None for any other group)."""
    g = cg.groups[group]
    ids = set().union(*g.factor_ids())
    if not (g.derived and g.prunable) or not ids <= set(units):
        return None
    fg, fu = g.factors
    starts = np.zeros(max(ids) + 1, dtype=np.int64)
    for f in ids:
        starts[f] = units[f].start
    return starts[fg] + fu


def read_index(cg: ChannelGraph, units: dict[int, slice], group: int, space: int) -> np.ndarray:
    """Flat mask entry of every channel of ``space`` (a space of gated ``group``); for a
    product group, ``[factors, channels]``: the entry of each factor's unit."""
    slots = factor_slots(cg, units, group)
    if slots is not None:
        return slots[cg.groups[group].unit_index[space]].T
    return units[group].start + cg.groups[group].unit_index[space]
