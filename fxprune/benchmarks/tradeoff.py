"""``fxprune bench tradeoff``: what the three knobs of the complexity cost do, on the digits ResNet.

* gamma sweep (units + layers): final FLOPs fraction and accuracy per gamma;
* unit-only, layer-only and combined gates over the same gammas: the accuracy/FLOPs
  curves, and the lowest FLOPs each reaches at matched accuracy;
* beta = 1 (FLOPs) against beta = 0 (parameters): where each removes cost, per stage;
* alpha sweep: the split between removed blocks and thinned units.

One table per study and one PNG with the four panels; every figure measured in the run.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from itertools import pairwise

import torch
from tabulate import tabulate

from ..config import PruneConfig
from ..digits import models
from ..digits.models import BLOCKS, FIRST_BLOCK, STAGES, stage_widths
from ..digits.training import Run, fit
from ..files import writable
from ..report.costs import layer_costs
from ..state import decisions

__all__ = ["main"]

#: fixed strength, straight-through theta gradients and the weight condition of removal:
#: the trade-off is swept over gamma and alpha, so no budget
BASE = PruneConfig("both", gamma=30.0, theta_lr=0.5, estimator="straight_through", warmup=0, w_tol=0.1, sharpen=0.0)


def _run(config: PruneConfig | None, epochs: int, seed: int) -> Run:
    torch.manual_seed(seed)
    return fit(models.resnet(), epochs, config, seed=seed)


def _thinned(run: Run) -> float:
    """Fraction of the units of the groups still in the model that were removed."""
    keep, _ = decisions(run.gated)
    if not keep:
        return 0.0  # layer gates only
    dense = {g.id: g.num_units for g in run.dense_graph.prunable_groups}
    total = sum(dense[g] for g in keep)
    return 1 - sum(int(k.sum()) for k in keep.values()) / max(total, 1)


def _stage_costs(run: Run, dense: dict) -> list[tuple[float, float]]:
    """Per stage (stem with stage 1, head with stage 3): FLOPs and parameters kept, as fractions."""
    now = layer_costs(run.model, (torch.zeros(1, 1, 8, 8),))

    def stage(name: str) -> int:
        first = int(name.split(".")[0])
        return min(max((first - FIRST_BLOCK) // BLOCKS, 0), STAGES - 1)

    out = []
    for s in range(STAGES):
        names = [n for n in dense if stage(n) == s]
        f0, p0 = sum(dense[n][0] for n in names), sum(dense[n][1] for n in names)
        f1, p1 = sum(now.get(n, (0, 0))[0] for n in names), sum(now.get(n, (0, 0))[1] for n in names)
        out.append((f1 / f0, p1 / p0))
    return out


def _row(label: str, run: Run) -> list:
    return [label, f"{run.accuracy:.1f}", f"{run.flops / run.dense_flops:.3f}", f"{run.params / run.dense_params:.3f}",
            f"{run.layers_removed}/{run.layers_total}", f"{100 * _thinned(run):.0f}"]


HEAD = ["run", "test acc %", "FLOPs fraction", "params fraction", "blocks removed", "units thinned in kept groups %"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxprune bench tradeoff", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["tradeoff"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gammas", type=float, nargs="+", default=[1, 3, 10, 30, 100])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1, 10])
    p.add_argument("--match", type=float, default=0.5, help="accuracy window of the matched comparison (points)")
    p.add_argument("--png", default="out/tradeoff.png")
    args = p.parse_args(argv)
    png = writable(args.png, "the trade-off plot")
    e, s = args.epochs, args.seed

    dense = _run(None, e, s)
    dense_costs = layer_costs(dense.model, (torch.zeros(1, 1, 8, 8),))
    print(f"digits ResNet ({STAGES} stages x {BLOCKS} blocks), {e} epochs, seed {s}, Adam 1e-3; dense: "
          f"{dense.accuracy:.1f}% test accuracy, {dense.flops:,} FLOPs, {dense.params:,} parameters\n")

    curves = {kind: {g: _run(replace(BASE, structures=kind, gamma=g), e, s) for g in args.gammas}
              for kind in ("both", "units", "layers")}
    rows = [_row(f"{kind}, gamma={g:g}", r) for kind, runs in curves.items() for g, r in runs.items()]
    print("gamma sweep, per gate kind\n" + tabulate(rows, headers=HEAD, tablefmt="github"))
    both = [curves["both"][g].flops for g in args.gammas]
    print(f"FLOPs fall monotonically with gamma (units + layers): {all(a >= b for a, b in pairwise(both))}\n")

    target = min(r.accuracy for r in curves["both"].values() if r.accuracy >= dense.accuracy - 3.0) \
        if any(r.accuracy >= dense.accuracy - 3.0 for r in curves["both"].values()) else dense.accuracy - 3.0
    matched = []
    for kind, runs in curves.items():
        ok = [(g, r) for g, r in runs.items() if r.accuracy >= target - args.match]
        g, r = min(ok, key=lambda gr: gr[1].flops) if ok else (None, None)
        matched.append([kind, f"{g:g}" if g is not None else "-", f"{r.accuracy:.1f}" if r else "-",
                        f"{r.flops / r.dense_flops:.3f}" if r else "none reaches it"])
    print(f"lowest FLOPs at test accuracy >= {target - args.match:.1f}% (combined's lowest accuracy within 3 points "
          f"of dense, minus {args.match:g})\n" + tabulate(matched, headers=["gates", "gamma", "test acc %", "FLOPs fraction"],
                                                       tablefmt="github") + "\n")

    betas = {b: _run(replace(BASE, beta=b), e, s) for b in (1.0, 0.0)}
    rows = []
    for b, r in betas.items():
        st = _stage_costs(r, dense_costs)
        rows.append([f"beta={b:g}", f"{r.accuracy:.1f}", f"{r.flops / r.dense_flops:.3f}", f"{r.params / r.dense_params:.3f}",
                     *[f"{f:.2f} / {q:.2f}" for f, q in st], " | ".join(stage_widths(r.model))])
    print("beta: FLOPs (1) against parameters (0), gamma 30\n" + tabulate(
        rows, headers=["run", "test acc %", "FLOPs fraction", "params fraction",
                       *[f"stage {i + 1} FLOPs / params kept" for i in range(STAGES)], "widths"], tablefmt="github") + "\n")

    alphas = {a: _run(replace(BASE, alpha=a), e, s) for a in args.alphas}
    rows = [_row(f"alpha={a:g}", r) for a, r in alphas.items()]
    print("alpha: layer against unit balance, gamma 30\n" + tabulate(rows, headers=HEAD, tablefmt="github"))

    _plot(png, dense, curves, betas, alphas, dense_costs, args)
    print(f"\nplot: {png}")
    return 0


def _plot(path, dense: Run, curves: dict, betas: dict, alphas: dict, dense_costs: dict, args) -> None:
    from matplotlib.figure import Figure  # no pyplot: the process-wide backend stays the user's

    fig = Figure(figsize=(11, 8))
    ax = fig.subplots(2, 2)
    a = ax[0, 0]
    runs = curves["both"]
    a.plot(args.gammas, [runs[g].flops / runs[g].dense_flops for g in args.gammas], "o-", color="#2b6cb0")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("gamma")
    a.set_ylabel("FLOPs fraction", color="#2b6cb0")
    b = a.twinx()
    b.plot(args.gammas, [runs[g].accuracy for g in args.gammas], "s--", color="#c53030")
    b.set_ylabel("test accuracy %", color="#c53030")
    a.set_title("gamma sweep (units + layers)", fontsize=9)

    a = ax[0, 1]
    for kind, runs in curves.items():
        a.plot([runs[g].flops / runs[g].dense_flops for g in args.gammas], [runs[g].accuracy for g in args.gammas], "o-",
               label={"both": "units + layers", "units": "units only", "layers": "layers only"}[kind])
    a.axhline(dense.accuracy, color="gray", ls=":", label="dense")
    a.set_xscale("log")
    a.set_xlabel("FLOPs fraction")
    a.set_ylabel("test accuracy %")
    a.legend(fontsize=8)
    a.set_title("accuracy against FLOPs, one point per gamma", fontsize=9)

    a = ax[1, 0]
    width = 0.35
    for i, (beta, r) in enumerate(betas.items()):
        st = _stage_costs(r, dense_costs)
        xs = [k + (i - 0.5) * width for k in range(STAGES)]
        a.bar(xs, [f for f, _ in st], width, label=f"beta={beta:g}: FLOPs kept", color=["#2b6cb0", "#c53030"][i])
        a.scatter(xs, [q for _, q in st], marker="_", s=300, color="black", zorder=3)
    a.set_xticks(range(STAGES), [f"stage {k + 1}" for k in range(STAGES)])
    a.set_ylabel("fraction kept (bars FLOPs, ticks params)")
    a.legend(fontsize=8)
    a.set_title("beta = 1 (FLOPs) against beta = 0 (parameters)", fontsize=9)

    a = ax[1, 1]
    xs = range(len(alphas))
    a.bar([x - 0.2 for x in xs], [r.layers_removed / max(r.layers_total, 1) for r in alphas.values()], 0.4,
          label="blocks removed", color="#2b6cb0")
    a.bar([x + 0.2 for x in xs], [_thinned(r) for r in alphas.values()], 0.4, label="units thinned in kept groups",
          color="#dd6b20")
    a.set_xticks(list(xs), [f"alpha={k:g}" for k in alphas])
    a.set_ylabel("fraction")
    a.legend(fontsize=8)
    a.set_title("alpha: layers against units (gamma 30)", fontsize=9)
    fig.suptitle(f"digits ResNet, {args.epochs} epochs, seed {args.seed}", fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
