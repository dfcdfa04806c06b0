"""Benchmarks, measured side by side in one run: ``fxprune bench analyze``.

``analyze``: wall time of ``fxprune.trace`` + ``fxprune.analyze`` against Torch-Pruning's
``DependencyGraph().build_dependency`` on the same model and the same input, median of
``--repeat`` runs each, and the ratio. Torch-Pruning is the optional ``bench`` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from tabulate import tabulate

from ..passes import analyze, trace

__all__ = ["main", "time_analysis"]

MODELS = ["resnet50", "mobilenet_v3_large", "densenet121", "vit_b_16", "convnext_tiny"]


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: first-call costs (imports, allocator) are not what is compared
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_analysis(name: str, repeat: int = 3, size: int = 224) -> dict:
    """Median seconds of fxprune trace+analyze and of Torch-Pruning's dependency graph."""
    import torch_pruning as tp

    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    ours = _median_seconds(lambda: analyze(trace(model, (x,))), repeat)
    theirs = _median_seconds(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x), repeat)
    return {"model": name, "fxprune_s": ours, "torch_pruning_s": theirs, "speedup": theirs / ours}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxprune bench", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["analyze"])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    if importlib.util.find_spec("torch_pruning") is None:
        p.error("this benchmark compares against Torch-Pruning: pip install 'fxprune[bench]'")
    rows = [time_analysis(m, args.repeat) for m in args.models]
    print(f"trace+analyze vs Torch-Pruning DependencyGraph.build_dependency, input 1x3x224x224, "
          f"median of {args.repeat}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(tabulate(
        [[r["model"], f"{r['fxprune_s'] * 1e3:.0f}", f"{r['torch_pruning_s'] * 1e3:.0f}", f"{r['speedup']:.2f}x"] for r in rows],
        headers=["model", "fxprune ms", "Torch-Pruning ms", "speed-up"],
    ))
    return 0 if all(r["speedup"] > 1 for r in rows) else 1
