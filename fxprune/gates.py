"""Gate modules: Bernoulli gates on units and layers, and how a gate is applied.

A gate holds ``theta`` (one probability per structure). In training mode it samples one
``xi ~ Bern(theta)`` per example and structure and returns the straight-through mask
``xi + theta - theta.detach()``; in eval mode it returns ``1[theta >= 0.5]``. While
``theta`` is exactly 0 or 1 (fixed masks), both modes give the same mask.

The ``"balanced"`` estimator (method.md section 4) keeps the forward and weights each
example's backward by ``xi / (2 theta) + (1 - xi) / (2 (1 - theta))``: the derivative with
the structure on and with it off count equally, a trapezoid estimate of
``loss(on) - loss(off)`` whose mean does not depend on the gate's own theta.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["BernoulliGate", "ChannelGateRead", "apply_layer_gate", "ESTIMATORS"]

#: the theta gradient estimators a gate can use
ESTIMATORS = ("straight_through", "balanced")


class BernoulliGate(nn.Module):
    """``theta`` for ``n`` structures; ``forward(ref)`` returns the mask for ``ref``'s batch.

    The mask is ``[n]`` in eval mode and ``[batch, n]`` in training mode (batch on dim 0).
    ``theta`` is a buffer, not a parameter: it is updated by the pruner's projected SGD,
    never by the user's optimizer, and it is saved in the state dict.
    """

    def __init__(self, n: int, theta_init: float = 1.0, segments: list[np.ndarray] | None = None,
                 estimator: str = "straight_through") -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.register_buffer("theta", torch.full((n,), float(theta_init)))
        self.set_segments([np.arange(n)] if segments is None else segments)

    def set_segments(self, segments: list[np.ndarray]) -> None:
        """The unit sets of the channel spaces the gate covers: the deterministic mask keeps
        at least the best unit of each, so no channel dimension becomes empty. Layer gates
        have none: a branch may go entirely."""
        width = max((len(s) for s in segments), default=0)
        pad = np.full((len(segments), width), -1, dtype=np.int64)
        for i, seg in enumerate(segments):
            pad[i, : len(seg)] = seg
        self.register_buffer("segments", torch.as_tensor(pad, device=self.theta.device), persistent=False)

    def deterministic(self) -> Tensor:
        """``1[theta >= 0.5]``, plus the best unit of any segment that would be empty."""
        theta = self.theta.detach()
        on = theta >= 0.5
        if not self.segments.numel():
            return on.to(theta.dtype)
        valid = self.segments >= 0
        units = self.segments.clamp_min(0)
        scores = torch.where(valid, theta[units], torch.full_like(units, -1, dtype=theta.dtype))
        best = units.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
        empty = ~(on[units] & valid).any(1)
        return on.to(theta.dtype).scatter_reduce(0, best, empty.to(theta.dtype), reduce="amax")

    def forward(self, ref: Tensor) -> Tensor:
        theta = self.theta.to(ref.dtype)
        if not self.training:
            return self.deterministic().to(ref.dtype)
        t = theta.detach().expand(ref.shape[0], -1)
        xi = torch.bernoulli(t)
        if self.estimator == "straight_through":
            return xi + theta - theta.detach()
        weight = xi / (2 * t.clamp_min(1e-3)) + (1 - xi) / (2 * (1 - t).clamp_min(1e-3))
        return xi + (theta - theta.detach()) * weight

    def slice_(self, keep: np.ndarray, segments: list[np.ndarray]) -> None:
        """Keep only the structures ``keep`` (bool), in place (live removal); ``segments``
        are the unit sets after renumbering."""
        idx = torch.as_tensor(np.flatnonzero(keep), dtype=torch.long, device=self.theta.device)
        requires_grad = self.theta.requires_grad
        self.theta = self.theta.detach().index_select(0, idx).requires_grad_(requires_grad)
        self.set_segments(segments)

    def keep(self) -> np.ndarray:
        """The deterministic keep pattern (what eval mode uses) as a bool array."""
        return (self.deterministic() > 0).cpu().numpy()

    def set_keep(self, keep: np.ndarray) -> None:
        """Set ``theta`` to the 0/1 pattern ``keep``."""
        with torch.no_grad():
            self.theta.copy_(torch.as_tensor(np.asarray(keep, dtype=np.float32)))

    def extra_repr(self) -> str:
        return f"n={self.theta.numel()}, estimator={self.estimator}"


class ChannelGateRead(nn.Module):
    """Multiplies the channels of ``x`` on ``dim`` by their units' gate values.

    ``index[c]`` is the unit (of ``num_units``) of channel ``c``; ``group`` and ``space``
    name the analysis entities the read belongs to, so the index can be refreshed after
    live removal.
    """

    def __init__(self, index: np.ndarray, dim: int, num_units: int, group: int = -1, space: int = -1) -> None:
        super().__init__()
        self.dim, self.group, self.space = dim, group, space
        self.set_index(index, num_units)

    def set_index(self, index: np.ndarray, num_units: int) -> None:
        identity = len(index) == num_units and np.array_equal(index, np.arange(num_units))
        self.register_buffer("index", None if identity else torch.as_tensor(np.asarray(index), dtype=torch.long))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask if self.index is None else mask.index_select(-1, self.index)
        shape = [1] * x.dim()
        shape[self.dim] = m.shape[-1]
        if m.dim() == 2:
            shape[0] = m.shape[0]
        return x * m.reshape(shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, group={self.group}"


def apply_layer_gate(x: Tensor, mask: Tensor) -> Tensor:
    """Scale a residual branch output by its layer gate (``[1]`` or ``[batch, 1]``)."""
    return x * mask.reshape([-1] + [1] * (x.dim() - 1))
