"""Latency of a model, eager and under ``torch.compile``, measured side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["latency_ms", "compile_model"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def latency_ms(model: nn.Module, x: Tensor, iters: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass on ``x`` in milliseconds (eval mode, no grad)."""
    model.eval()
    for _ in range(warmup):
        model(x)
    _sync(x.device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model(x)
        _sync(x.device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def compile_model(model: nn.Module, x: Tensor, mode: str | None = None) -> Callable[..., Any]:
    """``torch.compile(model, mode=mode)``, compiled now (one call on ``x``) so that later
    timings measure the compiled code, not the compilation."""
    compiled = torch.compile(model.eval(), mode=mode)
    with torch.inference_mode():
        compiled(x)
    return compiled
