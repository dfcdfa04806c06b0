"""Gate modules: Bernoulli gates on units and layers, and how a gate is applied.

A gate holds ``theta`` (one probability per structure). In training mode it samples one
``xi ~ Bern(theta)`` per example and structure and returns the straight-through mask
``xi + theta - theta.detach()``; in eval mode it returns ``1[theta >= 0.5]``. While
``theta`` is exactly 0 or 1 (fixed masks), both modes give the same mask.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["BernoulliGate", "ChannelGateRead", "apply_layer_gate"]


class BernoulliGate(nn.Module):
    """``theta`` for ``n`` structures; ``forward(ref)`` returns the mask for ``ref``'s batch.

    The mask is ``[n]`` in eval mode and ``[batch, n]`` in training mode (batch on dim 0).
    """

    def __init__(self, n: int, theta_init: float = 1.0) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.full((n,), float(theta_init)), requires_grad=False)

    def forward(self, ref: Tensor) -> Tensor:
        theta = self.theta.to(ref.dtype)
        if not self.training:
            return (theta >= 0.5).to(ref.dtype)
        xi = torch.bernoulli(theta.detach().expand(ref.shape[0], -1))
        return xi + theta - theta.detach()

    def keep(self) -> np.ndarray:
        """The deterministic keep pattern ``theta >= 0.5`` as a bool array."""
        return (self.theta.detach() >= 0.5).cpu().numpy()

    def set_keep(self, keep: np.ndarray) -> None:
        """Set ``theta`` to the 0/1 pattern ``keep``."""
        with torch.no_grad():
            self.theta.copy_(torch.as_tensor(np.asarray(keep, dtype=np.float32)))

    def extra_repr(self) -> str:
        return f"n={self.theta.numel()}"


class ChannelGateRead(nn.Module):
    """Multiplies the channels of ``x`` on ``dim`` by their units' gate values.

    ``index[c]`` is the unit (of ``num_units``) of channel ``c``.
    """

    def __init__(self, index: np.ndarray, dim: int, num_units: int) -> None:
        super().__init__()
        self.dim = dim
        identity = len(index) == num_units and np.array_equal(index, np.arange(num_units))
        self.register_buffer("index", None if identity else torch.as_tensor(index, dtype=torch.long))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask if self.index is None else mask.index_select(-1, self.index)
        shape = [1] * x.dim()
        shape[self.dim] = m.shape[-1]
        if m.dim() == 2:
            shape[0] = m.shape[0]
        return x * m.reshape(shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def apply_layer_gate(x: Tensor, mask: Tensor) -> Tensor:
    """Scale a residual branch output by its layer gate (``[1]`` or ``[batch, 1]``)."""
    return x * mask.reshape([-1] + [1] * (x.dim() - 1))
