"""``fxprune bench step``: what a training step with gates costs against the same step
without them, at the start of training (nothing removed yet).

Dense step: cross-entropy plus the L2 term ``lam1/2 ||W||^2`` (what the gated penalty's
slab replaces), backward, SGD with momentum. Gated step: the prepared model's forward
(sampled masks), the pruner's penalty, backward, the same optimizer, ``pruner.step()``
(theta update, no check). The two are timed interleaved, step by step, in one process on
the same thread count; the table gives medians and their ratio, and counts what the
pruner adds: aten ops per ``penalty()`` (against the model's own forward) and host
synchronisations per ``step()``. ``--compile`` also times both under ``torch.compile``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..api import prepare
from ..config import PruneConfig
from ..digits.models import resnet
from ..pruner import Pruner
from ..testing.models import load_model

__all__ = ["main", "measure", "CountOps"]


class CountOps(TorchDispatchMode):
    """Counts aten ops, and host synchronisations (``aten._local_scalar_dense``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _model(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    if name == "digits-resnet":
        return resnet(), (1, 8, 8), 10
    model = load_model(name)
    return model, (3, 224, 224), 1000


def measure(name: str, batch: int = 32, steps: int = 10, warmup: int = 2, lam1: float = 5e-4,
            compile: bool = False) -> dict:
    """Median seconds of a dense and a gated training step of model ``name``, interleaved
    (both under ``torch.compile`` with ``compile``; compilation happens in the warm-up)."""
    torch.manual_seed(0)
    dense, shape, classes = _model(name)
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    model = copy.deepcopy(dense)
    gated = prepare(model, (x,), PruneConfig("both", lam1=lam1, check_every=10**9))
    dense_opt = torch.optim.SGD(dense.parameters(), lr=1e-3, momentum=0.9)
    gated_opt = torch.optim.SGD(gated.parameters(), lr=1e-3, momentum=0.9)
    pruner = Pruner(gated, gated_opt)
    dense.train()
    gated.train()
    weights = list(dense.parameters())
    run_dense, run_gated = (torch.compile(dense), torch.compile(gated)) if compile else (dense, gated)

    def dense_step() -> None:
        loss = F.cross_entropy(run_dense(x), y) + 0.5 * lam1 * sum(p.pow(2).sum() for p in weights)
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()

    def gated_step() -> None:
        loss = F.cross_entropy(run_gated(x), y) + pruner.penalty()
        gated_opt.zero_grad()
        loss.backward()
        gated_opt.step()
        pruner.step()

    times: dict[str, list[float]] = {"dense": [], "gated": []}
    for i in range(warmup + steps):
        for label, fn in (("dense", dense_step), ("gated", gated_step)):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[label].append(time.perf_counter() - t0)
    with CountOps() as forward, torch.no_grad():
        dense(x)
    with CountOps() as penalty:
        pruner.penalty()
    (F.cross_entropy(run_gated(x), y) + pruner.penalty()).backward()  # theta gradients, as in training
    with CountOps() as step_only:
        pruner.step()
    d, g = statistics.median(times["dense"]), statistics.median(times["gated"])
    return {"model": name, "mode": "torch.compile" if compile else "eager", "dense_s": d, "gated_s": g, "ratio": g / d,
            "forward_ops": forward.ops,
            "penalty_ops": penalty.ops, "step_syncs": step_only.syncs,
            "gates": pruner.theta.numel(), "weights": len(pruner.objective.weights)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxprune bench step", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["step"])
    p.add_argument("--models", nargs="*", default=["digits-resnet", "resnet50"],
                   help="'digits-resnet' or torchvision names (default: digits-resnet resnet50)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind (default 10)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--compile", action="store_true", help="also time both steps under torch.compile")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(m, args.batch, args.steps, compile=c) for m in args.models
            for c in ([False, True] if args.compile else [False])]
    print(f"training step with gates against without, batch {args.batch}, median of {args.steps} interleaved steps, "
          f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}")
    print(tabulate(
        [[r["model"], r["mode"], f"{1e3 * r['dense_s']:.1f}", f"{1e3 * r['gated_s']:.1f}", f"{r['ratio']:.2f}",
          r["gates"], r["weights"], r["penalty_ops"], r["forward_ops"], r["step_syncs"]] for r in rows],
        headers=["model", "mode", "dense ms", "gated ms", "gated / dense", "gates", "weight tensors", "aten ops per penalty()",
                 "aten ops per forward", "host syncs per step()"], tablefmt="github"))
    return 0
