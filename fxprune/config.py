"""One config object for the whole method (PyTorch quantization's ``QConfig`` style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PruneConfig"]


@dataclass
class PruneConfig:
    """What to gate and how the gates start.

    Attributes:
        structures: which structures get gates: ``"units"`` (channel groups),
            ``"layers"`` (residual branches) or ``"both"``.
        theta_init: initial keep probability of every gate (1 = start from the full network).
    """

    structures: Literal["units", "layers", "both"] = "both"
    theta_init: float = 1.0

    def __post_init__(self) -> None:
        if self.structures not in ("units", "layers", "both"):
            raise ValueError(f"PruneConfig.structures must be 'units', 'layers' or 'both', got {self.structures!r}")
        if not 0.0 <= self.theta_init <= 1.0:
            raise ValueError(f"PruneConfig.theta_init must lie in [0, 1], got {self.theta_init}")
