"""``fxprune bench digits``: pruning while training on the built-in digits data, against
dense training of the same schedule and against magnitude pruning with Torch-Pruning.

Every figure is measured in this run: test accuracy on the fixed 360-image split,
parameters and forward FLOPs per example of the final model (``FlopCounterMode``), the
cumulative training FLOPs over dense training's, the fraction of gates whose theta ends
strictly inside (0.01, 0.99), and for the robustness table the final widths over seeds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from collections.abc import Callable
from dataclasses import replace

import torch
from tabulate import tabulate
from torch import nn

from ..api import prepare
from ..config import PruneConfig
from ..digits import models
from ..digits.recipes import EXPERIMENTS, ROBUSTNESS, Experiment
from ..digits.training import Run, fit
from ..objective import Objective

__all__ = ["main", "Experiment", "EXPERIMENTS", "ROBUSTNESS", "robustness"]


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with torch seeded first: every run's initial weights depend on its seed
    alone, not on what ran before it."""
    torch.manual_seed(seed)
    return build()


def _row(name: str, method: str, seed: int, run: Run) -> list:
    return [
        name, method, seed, f"{run.accuracy:.1f}", f"{run.params:,}", f"{100 * (1 - run.params / run.dense_params):.1f}",
        f"{run.flops / run.dense_flops:.3f}", f"{run.train_flops_ratio:.2f}", f"{100 * run.undecided:.1f}",
        f"{run.layers_removed}/{run.layers_total}" if run.layers_total else "-",
        " ".join(map(str, run.widths[:-1])), f"{run.seconds:.0f}",
    ]


HEADERS = ["model", "method", "seed", "test acc %", "params", "params removed %", "FLOPs fraction",
           "training FLOPs ratio", "theta in (0.01,0.99) %", "layers removed", "hidden widths", "s"]


def compare(exp: Experiment, seed: int, epochs: int, baseline: bool) -> list[list]:
    """Dense, pruned while training and (with Torch-Pruning) magnitude-pruned, one seed."""
    rows = []
    opt = {"optimizer": exp.optimizer, "lr": exp.lr, "schedule": exp.schedule}
    dense = fit(_seeded(exp.build, seed), epochs, seed=seed, **opt)
    rows.append(_row(exp.name, "dense", seed, dense))
    pruned = fit(_seeded(exp.build, seed), epochs, exp.config, seed=seed, **opt)
    rows.append(_row(exp.name, f"fxprune ({exp.config.structures}, gamma={exp.config.gamma:g})", seed, pruned))
    if baseline and exp.baseline:
        from .baseline import magnitude_baseline

        tp = magnitude_baseline(_seeded(exp.build, seed), epochs, pruned.flops, seed=seed, **opt)
        rows.append(_row(exp.name, "Torch-Pruning magnitude + fine-tune", seed, tp))
    return rows


def _needs_reference(config: PruneConfig) -> bool:
    return config.cost != "gates"


def robustness(widths: tuple[float, ...], seeds: int, epochs: int, config: PruneConfig, **opt) -> tuple[list[list], dict]:
    """LeNet-300-100 at each width multiplier and seed. A cost normalised by the model's
    own (``"complexity"``, ``"structures"``) is normalised by the x1 model's for every width
    (its FLOPs, parameters and gates), so the price of a unit does not depend on how many
    units the model starts with; ``"gates"`` prices a unit in task loss and needs none."""
    if _needs_reference(config):
        x1 = prepare(models.lenet_300_100(1), (torch.zeros(2, 1, 8, 8),), config)
        config = replace(config, cost_reference=Objective(x1).reference)
    runs = {w: [fit(_seeded(lambda w=w: models.lenet_300_100(w), s), epochs, config, seed=s, **opt) for s in range(seeds)]
            for w in widths}
    rows, summary = [], {}
    base = [statistics.mean(r.widths[i] for r in runs[widths[0]]) for i in range(2)]
    for w, rs in runs.items():
        layer_w = [[r.widths[i] for r in rs] for i in range(2)]
        means = [statistics.mean(v) for v in layer_w]
        cvs = [statistics.pstdev(v) / m if m else float("nan") for v, m in zip(layer_w, means)]
        accs = [r.accuracy for r in rs]
        summary[w] = {"means": means, "cv": cvs, "acc": accs}
        rows.append([
            f"x{w:g}", len(rs), " ".join(f"{m:.0f}" for m in means), " ".join(f"{c:.2f}" for c in cvs),
            " ".join(f"{m / b:.2f}" for m, b in zip(means, base)), f"{statistics.mean(accs):.1f}",
            f"{min(accs):.1f}-{max(accs):.1f}", f"{100 * statistics.mean(1 - r.params / r.dense_params for r in rs):.1f}",
            f"{100 * max(r.undecided for r in rs):.1f}",
        ])
    return rows, summary


ROBUST_HEADERS = ["width", "seeds", "final widths (mean)", "CV per layer", "width / x1's", "acc mean %", "acc range %",
                  "params removed %", "max theta undecided %"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxprune bench digits", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["digits"])
    p.add_argument("--seeds", type=int, default=5, help="seeds of the robustness table (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the comparison table (default 0)")
    p.add_argument("--quick", action="store_true", help="a few epochs and two seeds: checks that it runs, not results")
    p.add_argument("--only", nargs="*", help="experiment names to run (default all); 'robustness' for that table")
    args = p.parse_args(argv)
    baseline = importlib.util.find_spec("torch_pruning") is not None
    scale = 0.1 if args.quick else 1.0
    seeds = min(args.seeds, 2) if args.quick else args.seeds
    wanted = set(args.only) if args.only else None

    rows = []
    for exp in EXPERIMENTS:
        if wanted is None or exp.name in wanted:
            rows += compare(exp, args.seed, max(2, round(exp.epochs * scale)), baseline)
            print(tabulate(rows[-3:], headers=HEADERS), flush=True)
    if rows:
        optims = ", ".join(sorted({f"{e.optimizer} lr {e.lr:g} {e.schedule}" for e in EXPERIMENTS
                                   if wanted is None or e.name in wanted}))
        print(f"\nDigits (sklearn, 1437 train / 360 test, split seed 0), {optims}, batch 64, seed {args.seed}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(tabulate(rows, headers=HEADERS, tablefmt="github"))
        if not baseline:
            print("Torch-Pruning is not installed (pip install 'fxprune[bench]'): no baseline rows")
    if wanted is None or "robustness" in wanted:
        exp = EXPERIMENTS[0]
        epochs = max(2, round(exp.epochs * scale))
        for config in ROBUSTNESS.values():
            rrows, _ = robustness((1, 2, 4), seeds, epochs, config, optimizer=exp.optimizer, lr=exp.lr,
                                  schedule=exp.schedule)
            print(f"\nRobustness: LeNet-300-100 at widths x1, x2, x4, seeds 0-{seeds - 1}, {epochs} epochs, "
                  f"cost={config.cost!r}, gamma={config.gamma:g}, "
                  + ("normalised by the x1 model" if _needs_reference(config) else "no reference"))
            print(tabulate(rrows, headers=ROBUST_HEADERS, tablefmt="github"), flush=True)
    return 0
