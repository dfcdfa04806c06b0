"""``fxprune demo``: train and prune a ResNet on the built-in digits data, end to end.

It trains the digits ResNet (3 stages of 3 basic blocks) dense, then again from the
same initial weights while pruning units and whole blocks; prints the before/after table;
saves the compact model (``.pt2`` and a Python package, both loadable without fxprune);
draws where the gates sit and what they decided; and times the dense and compact models
eager and under ``torch.compile``. Every figure is measured in the run.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

import torch
from tabulate import tabulate
from torch import nn
from tqdm import tqdm

from ..config import PruneConfig
from ..export import save_compact
from ..files import writable
from ..report.costs import cost_table, layer_costs, plot_costs
from ..report.gate_graph import gate_graph, write_gate_graph
from ..report.latency import compile_model, latency_ms
from . import models
from .data import digits
from .models import BLOCKS, STAGES, stage_widths
from .recipes import EXPERIMENTS
from .training import Run, fit

__all__ = ["main", "run", "add_arguments"]

#: the digits benchmark's ResNet entry: its gate config, optimizer, learning rate, schedule and epochs
RECIPE = next(e for e in EXPERIMENTS if e.build is models.resnet)


def _bar(desc: str, epochs: int):
    bar = tqdm(total=epochs, desc=desc, unit="epoch", dynamic_ncols=True)

    def update(stats: dict) -> None:
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.1f}%",
                        params=f"{100 * stats['params']:.1f}%", flops=f"{100 * stats['flops']:.1f}%")
        bar.update(1)

    return bar, update


def _train(desc: str, epochs: int, config: PruneConfig | None, seed: int) -> Run:
    torch.manual_seed(seed)
    bar, update = _bar(desc, epochs)
    with bar:
        return fit(models.resnet(), epochs, config, seed=seed, optimizer=RECIPE.optimizer, lr=RECIPE.lr,
                   schedule=RECIPE.schedule, on_epoch=update)


def _latency(dense: nn.Module, compact: nn.Module, batch: int, compile: bool) -> tuple[list[list], float]:
    x = digits()[2][:batch]
    timings = {"eager": (latency_ms(dense, x), latency_ms(compact, x))}
    seconds = 0.0
    if compile:
        t0 = time.perf_counter()
        cd, cc = compile_model(dense, x), compile_model(compact, x)
        seconds = time.perf_counter() - t0
        timings["torch.compile"] = (latency_ms(cd, x), latency_ms(cc, x))
    rows = [[mode, f"{d:.2f}", f"{c:.2f}", f"{d / c:.2f}x"] for mode, (d, c) in timings.items()]
    return rows, seconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=RECIPE.epochs,
                   help=f"training epochs, dense and pruned (default {RECIPE.epochs})")
    p.add_argument("--gamma", type=float, default=RECIPE.config.gamma,
                   help=f"strength of the complexity cost (default {RECIPE.config.gamma:g})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/demo", help="folder for the compact model and the picture (default out/demo)")
    p.add_argument("--batch", type=int, default=256, help="batch size of the latency measurement (default 256)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile latency measurement")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxprune demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The demo with parsed arguments (see :func:`add_arguments`)."""
    if args.epochs < 1 or args.batch < 1:
        raise ValueError("--epochs and --batch must be at least 1")
    out = writable(args.out, "the demo's outputs", folder=True)

    config: PruneConfig = replace(RECIPE.config, gamma=args.gamma)
    print(f"fxprune demo: digits ResNet ({STAGES} stages x {BLOCKS} basic blocks), {args.epochs} epochs, "
          f"unit + layer gates, gamma={args.gamma:g}, {config.estimator} estimator, {RECIPE.optimizer} lr {RECIPE.lr:g} "
          f"{RECIPE.schedule}, seed {args.seed}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()})")
    dense = _train("dense training           ", args.epochs, None, args.seed)
    pruned = _train("pruning while training   ", args.epochs, config, args.seed)

    compact = pruned.model
    example = (digits()[2][:1],)
    paths = save_compact(compact, example, out)
    picture = write_gate_graph(gate_graph(pruned.dense_graph, pruned.gated), out / "gates.png",
                               f"digits ResNet, gamma={args.gamma:g}: kept / all units, layer gates")
    before, after = layer_costs(dense.model, example), layer_costs(compact, example)
    costs = plot_costs(before, after, out / "cost_per_layer.png", f"digits ResNet, gamma={args.gamma:g}: cost per layer")
    lat_rows, compile_s = _latency(dense.model, compact, args.batch, not args.no_compile)

    blocks = STAGES * BLOCKS
    rows = [
        ["test accuracy %", f"{dense.accuracy:.1f}", f"{pruned.accuracy:.1f}"],
        ["parameters", f"{dense.params:,}", f"{pruned.params:,} ({100 * pruned.params / dense.params:.1f}%)"],
        ["FLOPs per image", f"{dense.flops:,}", f"{pruned.flops:,} ({100 * pruned.flops / dense.flops:.1f}%)"],
        ["residual blocks", f"{blocks}", f"{blocks - pruned.layers_removed}"],
        *[[f"stage {i + 1} widths", d, c] for i, (d, c) in enumerate(zip(stage_widths(dense.model), stage_widths(compact)))],
        ["training FLOPs (dense = 1)", "1.00", f"{pruned.train_flops_ratio:.2f} ({100 * (1 - pruned.train_flops_ratio):.0f}% saved)"],
        ["gates undecided at the end", "-", f"{100 * pruned.undecided:.1f}%"],
        ["training time s", f"{dense.seconds:.0f}", f"{pruned.seconds:.0f}"],
    ]
    print()
    print(tabulate(rows, headers=["", "dense", "pruned while training"], tablefmt="github"))
    print()
    print("cost per layer (FLOPs per image; a layer with 0 was removed)")
    print(cost_table(before, after))
    print()
    print(f"latency, batch {args.batch}, ms (median of 20)")
    print(tabulate(lat_rows, headers=["", "dense", "compact", "dense / compact"], tablefmt="github"))
    print(f"FLOPs ratio dense / compact {dense.flops / pruned.flops:.1f}x"
          + (f"; compiling both models took {compile_s:.0f} s" if compile_s else ""))
    print()
    print(f"compact model: {paths['pt2']} (torch.export.load(path).module()) and {paths['package']}/ "
          f"(from compact_model import CompactModel)")
    print(f"gate placement: {picture}; cost per layer: {costs}")
    return 0
