"""Unit sets as tensors: the index matrix of a group's segments, and the floor every
channel dimension keeps (on the gates' device, without a host sync)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["segment_matrix", "floor_keep"]


def segment_matrix(segments: list[np.ndarray], offset: int = 0) -> torch.Tensor:
    """Unit sets as one ``[segments, width]`` index matrix (``offset`` added), padded with -1."""
    width = max((len(s) for s in segments), default=0)
    pad = np.full((len(segments), width), -1, dtype=np.int64)
    for i, seg in enumerate(segments):
        pad[i, : len(seg)] = np.asarray(seg) + offset
    return torch.as_tensor(pad)


def floor_keep(keep: torch.Tensor, score: torch.Tensor, segments: torch.Tensor,
               least: int | torch.Tensor = 1) -> torch.Tensor:
    """``keep`` (bool) with, in every segment (a row of :func:`segment_matrix`) that would
    keep fewer than ``least`` units (an int, or one per segment), its ``least`` units of
    highest ``score`` kept too (all of a shorter segment; the first ones among equal
    scores): a channel dimension never becomes empty, nor falls under its floor. Tensor
    ops only, so it runs on the gates' device without a host sync."""
    if not segments.numel():
        return keep
    valid = segments >= 0
    units = segments.clamp_min(0)
    scores = torch.where(valid, score[units].to(torch.float32), torch.tensor(-1.0, device=score.device))
    if isinstance(least, torch.Tensor):
        least = least.to(segments.device)
        order = scores.sort(dim=1, descending=True, stable=True).indices
        wanted = torch.arange(segments.shape[1], device=segments.device)[None, :] < least[:, None]
    else:
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, :min(least, segments.shape[1])]
        wanted = torch.ones((), dtype=torch.bool, device=segments.device)
    # a stable order: among equal scores the first unit, which stays the one picked when
    # other units are removed (live removal must not change what eval mode keeps)
    best, best_valid = units.gather(1, order), valid.gather(1, order) & wanted  # [segments, k]
    short = (keep[units] & valid).sum(1) < least
    add = (short[:, None] & best_valid).to(torch.uint8)
    return keep.to(torch.uint8).scatter_reduce(0, best.flatten(), add.flatten(), reduce="amax").bool()
