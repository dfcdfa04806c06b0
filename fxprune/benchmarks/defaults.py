"""``fxprune bench defaults``: what a user gets with ``PruneConfig()`` alone, and with a
FLOPs budget, on five tasks and three optimizers at constant learning rates.

Tasks: LeNet-300-100, LeNet-5 and the ResNet on the digits, MLPs on scikit-learn's
breast-cancer and wine tables. Optimizers: Adam (1e-3), SGD with Nesterov momentum
(0.05) and AdamW (1e-3, its default weight decay), each at a constant learning rate, the
same for the dense run it is compared with. Every cell, over three seeds, reports the test
accuracy against dense, the accuracy of the final widths trained from scratch (is a gap
the method's or the smaller architecture's?), the parameters removed, the FLOPs fraction
of the final model, the gates left undecided (theta in (0.01, 0.99)) and the training
FLOPs ratio; then the FLOPs fraction and accuracy at each tighter budget. Then the robustness table
(widths x1/x2/x4, five seeds, on the defaults) and the wall-clock of pruning while
training against dense training on the digits ResNet, on the defaults and on the digits
benchmark's ResNet recipe with removal on theta alone.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from tabulate import tabulate
from torch import nn

from ..config import PruneConfig
from ..digits import models
from ..digits.recipes import EXPERIMENTS
from ..digits.training import Run, fit, reinitialised

__all__ = ["Task", "TASKS", "OPTIMIZERS", "grid_row", "main"]


@dataclass
class Task:
    name: str
    build: Callable[[float], nn.Module]
    dataset: str
    epochs: int
    image: bool = True


TASKS = [
    Task("LeNet-300-100 / digits", lambda w=1: models.lenet_300_100(w), "digits", 30),
    Task("LeNet-5 / digits", lambda w=1: models.lenet5(w), "digits", 30),
    Task("ResNet / digits", lambda w=1: models.resnet(w), "digits", 20),
    Task("MLP / breast-cancer", lambda w=1: models.mlp(30, 2, width=w), "breast_cancer", 60, image=False),
    Task("MLP / wine", lambda w=1: models.mlp(13, 3, width=w), "wine", 100, image=False),
]
#: the optimizers and their constant learning rates
OPTIMIZERS = {"adam": 1e-3, "sgd": 0.05, "adamw": 1e-3}


def _run(task: Task, optimizer: str, config: PruneConfig | None, seed: int = 0, width: float = 1) -> Run:
    torch.manual_seed(seed)
    model = task.build(width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AdamW's own weight decay is part of the set-up measured
        return fit(model, task.epochs, config, seed=seed, lr=OPTIMIZERS[optimizer], optimizer=optimizer,
                   dataset=task.dataset, image=task.image)


def _mean(values) -> float:
    return statistics.mean(values)


def grid_row(task: Task, optimizer: str, seeds: int, default: bool, budgets: list[float]) -> list:
    """One task and optimizer over ``seeds`` seeds: dense, ``PruneConfig()`` (``default``),
    the same final widths trained from scratch, and each budget in ``budgets``. Accuracies
    are means over the seeds, differences are paired (each seed's pruned run against its own
    dense run), FLOPs fractions are means with the seeds' range, undecided is the worst seed."""
    row = [task.name, optimizer]
    dense = [_run(task, optimizer, None, s) for s in range(seeds)]
    row.append(f"{_mean(d.accuracy for d in dense):.1f}")

    def vs_dense(runs: list[Run]) -> str:
        return f"{_mean(r.accuracy for r in runs):.1f} ({_mean(r.accuracy - d.accuracy for r, d in zip(runs, dense)):+.1f})"

    def fraction(runs: list[Run]) -> str:
        f = [r.flops / r.dense_flops for r in runs]
        return f"{_mean(f):.3f}" + (f" ({min(f):.3f}-{max(f):.3f})" if len(f) > 1 else "")

    if default:
        pruned = [_run(task, optimizer, PruneConfig(), s) for s in range(seeds)]
        scratch = []
        for s, run in enumerate(pruned):  # the architecture pruning found, trained from scratch as the dense one was
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scratch.append(fit(reinitialised(run.model, s), task.epochs, None, seed=s, lr=OPTIMIZERS[optimizer],
                                   optimizer=optimizer, dataset=task.dataset, image=task.image))
        row += [vs_dense(pruned), vs_dense(scratch), fraction(pruned),
                f"{100 * _mean(1 - r.params / r.dense_params for r in pruned):.1f}", f"{_mean(r.train_flops_ratio for r in pruned):.2f}",
                f"{100 * max(r.undecided for r in pruned):.1f}"]
    for f in budgets:
        runs = [_run(task, optimizer, PruneConfig(target_flops=f), s) for s in range(seeds)]
        row += [fraction(runs), vs_dense(runs)]
    return row


def grid_headers(default: bool, budgets: list[float]) -> list[str]:
    return (["task", "optimizer", "dense acc %"]
            + (["PruneConfig(): acc % (vs dense)", "its widths from scratch (vs dense)", "FLOPs fraction", "params removed %",
                "training FLOPs", "undecided %"] if default else [])
            + [h for f in budgets for h in (f"target_flops={f:g}: FLOPs", "acc % (vs dense)")])


def robustness(task: Task, widths: tuple[float, ...], seeds: int, optimizer: str, config: PruneConfig) -> list[list]:
    """Final hidden widths over seeds at each width multiplier, on ``config``."""
    runs = {w: [_run(task, optimizer, config, s, w) for s in range(seeds)] for w in widths}
    base = None
    rows = []
    for w, rs in runs.items():
        layer_w = list(zip(*[r.widths[:-1] for r in rs]))
        means = [statistics.mean(v) for v in layer_w]
        base = base or means
        cvs = [statistics.pstdev(v) / m if m else float("nan") for v, m in zip(layer_w, means)]
        accs = [r.accuracy for r in rs]
        frac = statistics.mean(r.flops / r.dense_flops for r in rs)
        rows.append([task.name, f"x{w:g}", f"{frac:.3f}", " ".join(f"{m:.0f}" for m in means), f"{max(cvs):.2f}",
                     " ".join(f"{m / b:.2f}" for m, b in zip(means, base)), f"{statistics.mean(accs):.1f}",
                     f"{min(accs):.1f}-{max(accs):.1f}", f"{100 * max(r.undecided for r in rs):.1f}"])
    return rows


ROBUST_HEADERS = ["task", "width", "FLOPs fraction", "final widths (mean)", "max CV", "widths / x1's", "acc mean %", "acc range %",
                  "max undecided %"]


def wall_clock(task: Task, optimizer: str, label: str, config: PruneConfig, dense: list[Run]) -> list:
    """Seconds of pruning while training against ``dense``'s, medians of as many runs (the
    same seed: only the clock differs between them)."""
    pruned = [_run(task, optimizer, config) for _ in dense]
    d, p = (statistics.median(r.seconds for r in runs) for runs in (dense, pruned))
    return [task.name, optimizer, label, f"{d:.1f}", f"{p:.1f}", f"{p / d:.2f}", f"{pruned[0].train_flops_ratio:.2f}",
            f"{dense[0].accuracy:.1f}", f"{pruned[0].accuracy:.1f}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxprune bench defaults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["defaults"])
    p.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25, 0.1], help="target_flops of the budget grid")
    p.add_argument("--tasks", nargs="*", help="task names (default all)")
    p.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    p.add_argument("--grid-seeds", type=int, default=3, help="seeds of every grid cell (default 3)")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the robustness table (default 5)")
    p.add_argument("--only", nargs="*", choices=["grid", "budgets", "robustness", "wall"], help="parts to run")
    p.add_argument("--repeat", type=int, default=3, help="runs whose median time the wall-clock table takes (default 3)")
    p.add_argument("--quick", action="store_true", help="a tenth of the epochs and one seed: checks that it runs, not results")
    args = p.parse_args(argv)
    if args.quick:
        args.grid_seeds, args.seeds, args.repeat = 1, 1, 1
    parts = set(args.only or ["grid", "budgets", "robustness", "wall"])
    every = [replace(t, epochs=max(1, t.epochs // 10)) if args.quick else t for t in TASKS]
    tasks = [t for t in every if not args.tasks or t.name.split(" /")[0] in args.tasks or t.name in args.tasks]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; constant learning rates "
          f"{', '.join(f'{k} {v:g}' for k, v in OPTIMIZERS.items())}; batch 64", flush=True)
    default = "grid" in parts
    budgets = [f for f in args.budgets if not default or f != PruneConfig().targets.get("flops")] if "budgets" in parts else []
    if default or budgets:
        rows = []
        for task in tasks:
            for optimizer in args.optimizers:
                rows.append(grid_row(task, optimizer, args.grid_seeds, default, budgets))
                print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
        print(f"\nMeans over seeds 0-{args.grid_seeds - 1}; differences paired with each seed's dense run")
        print(tabulate(rows, headers=grid_headers(default, budgets), tablefmt="github"), flush=True)
    if "robustness" in parts:
        rows = []
        for task in every[:2]:
            rows += robustness(task, (1, 2, 4), args.seeds, "adam", PruneConfig())
            print(tabulate(rows[-3:], tablefmt="plain"), flush=True)
        print(f"\nRobustness on PruneConfig(), Adam, seeds 0-{args.seeds - 1}")
        print(tabulate(rows, headers=ROBUST_HEADERS, tablefmt="github"), flush=True)
    if "wall" in parts:
        # the digits benchmark's ResNet recipe, with removal on theta alone (w_tol=None) in place of its pinned w_tol
        recipe = replace(next(e for e in EXPERIMENTS if e.name.startswith("ResNet")).config, w_tol=None)
        dense = {o: [_run(every[2], o, None) for _ in range(args.repeat)] for o in ("sgd", "adam")}
        rows = [wall_clock(every[2], o, label, c, dense[o])
                for label, c in (("PruneConfig()", PruneConfig()), ("ResNet recipe, w_tol=None", recipe)) for o in ("sgd", "adam")]
        print(f"\nPruning while training against dense training, same epochs (digits ResNet; median seconds of {args.repeat} runs)")
        print(tabulate(rows, headers=["task", "optimizer", "config", "dense s", "pruned s", "pruned / dense", "training FLOPs",
                                      "dense acc %", "pruned acc %"], tablefmt="github"))
    return 0
