"""The baseline a user would pick instead: train dense, prune by weight magnitude with
Torch-Pruning to a FLOPs target, fine-tune. Torch-Pruning is the optional ``bench`` extra.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..cost import forward_flops
from ..digits.training import Run, accuracy, make_optimizer, make_schedule, seeded_digits, train_epochs, widths

__all__ = ["magnitude_prune", "magnitude_baseline"]


def _last_called(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the conv or linear module that runs last (the classifier, kept whole)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1]


def magnitude_prune(model: nn.Module, example: torch.Tensor, target_flops: float, tol: float = 0.02) -> nn.Module:
    """A copy of ``model`` with channels removed by L2 magnitude (Torch-Pruning's
    ``MagnitudePruner``, the same ratio in every layer, classifier kept) whose forward FLOPs
    are the closest to ``target_flops``, on either side: a bisection on the pruning ratio
    brackets the target, and of the two models around it the closer is taken (at a few
    per cent of a small model's FLOPs one step of the ratio can halve them)."""
    import torch_pruning as tp

    head = _last_called(model, example)

    def pruned(ratio: float) -> tuple[nn.Module, float]:
        m = copy.deepcopy(model).eval()
        tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[m.get_submodule(head)]).step()
        return m, forward_flops(m, (example,))

    lo, hi = 0.0, 0.9  # Torch-Pruning leaves a model untouched at ratios that would empty a layer
    under = pruned(hi)
    if under[1] > target_flops:
        return under[0]  # as small as magnitude pruning gets
    over = (copy.deepcopy(model).eval(), forward_flops(model, (example,)))
    for _ in range(20):
        mid = (lo + hi) / 2
        m = pruned(mid)
        if m[1] <= target_flops:
            hi, under = mid, m
        else:
            lo, over = mid, m
        if hi - lo < tol / 10:
            break
    return min(over, under, key=lambda c: abs(c[1] - target_flops))[0]


def magnitude_baseline(model: nn.Module, epochs: int, target_flops: float, *, prune_at: float = 0.5, seed: int = 0,
                       lr: float = 1e-3, optimizer: str = "adam", schedule: str = "constant", image: bool = True,
                       lam1: float = 5e-4) -> Run:
    """Dense training for ``prune_at * epochs``, magnitude pruning to ``target_flops``, then
    fine-tuning for the rest of the epochs (the same total as the pruning run). Each phase
    has its own optimizer and ``schedule`` over its own steps."""
    train, test, batch, dense_params, dense_flops = seeded_digits(model, seed, image=image)
    example = batch[:1]
    t0 = time.perf_counter()
    first = round(prune_at * epochs)

    def phase(net: nn.Module, n: int) -> None:
        opt = make_optimizer(net.parameters(), optimizer, lr)
        train_epochs(net, train, n, opt, lam1, schedule=make_schedule(opt, schedule, n * len(train)))

    phase(model, first)
    small = magnitude_prune(model, example, target_flops)
    small_flops = forward_flops(small, (example,))
    phase(small, epochs - first)
    ratio = (first * dense_flops + (epochs - first) * small_flops) / (epochs * dense_flops)
    return Run(small.eval(), accuracy(small, test), sum(p.numel() for p in small.parameters()), small_flops,
               dense_params, dense_flops, widths(small), ratio, seconds=time.perf_counter() - t0)
