"""Where the cost sits: FLOPs and parameters per layer, dense against now.

``layer_costs(model, example)`` counts each module's forward FLOPs with
``FlopCounterMode`` (per module, as it attributes them) and its own parameters. The
dense model, the live gated model during training and the compact model keep the same
module names, so their costs line up layer by layer: ``cost_table`` prints them and
``plot_costs`` draws them (matplotlib PNG).
"""

from __future__ import annotations

import os
from pathlib import Path

from tabulate import tabulate
from torch import Tensor, nn

from ..cost import count_flops
from ..files import writable
from ..gates import GATE_MODULES

__all__ = ["layer_costs", "cost_table", "plot_costs"]


def layer_costs(model: nn.Module, example: tuple) -> dict[str, tuple[int, int]]:
    """``{module name: (forward FLOPs per example, own parameters)}`` for every module with
    parameters or FLOPs of its own, in module order (fxprune's gate modules excluded)."""
    counter = count_flops(model, tuple(t[:1] if isinstance(t, Tensor) else t for t in example))
    per_module = {k.partition(".")[2]: sum(v.values()) for k, v in counter.get_flop_counts().items() if "." in k}
    out = {}
    for name, m in model.named_modules():
        if not name or isinstance(m, GATE_MODULES):
            continue
        params = sum(p.numel() for p in m.parameters(recurse=False))
        leaf = not any(True for _ in m.children())
        flops = per_module.get(name, 0) if leaf else 0
        if params or flops:
            out[name] = (int(flops), int(params))
    return out


def _rows(dense: dict, current: dict) -> list[list]:
    rows = []
    for name, (f0, p0) in dense.items():
        f1, p1 = current.get(name, (0, 0))
        rows.append([name, f0, f1, f"{100 * f1 / f0:.0f}" if f0 else "-", p0, p1, f"{100 * p1 / p0:.0f}" if p0 else "-"])
    tf0, tp0 = sum(v[0] for v in dense.values()), sum(v[1] for v in dense.values())
    tf1, tp1 = sum(v[0] for v in current.values()), sum(v[1] for v in current.values())
    rows.append(["total", tf0, tf1, f"{100 * tf1 / max(tf0, 1):.1f}", tp0, tp1, f"{100 * tp1 / max(tp0, 1):.1f}"])
    return rows


def cost_table(dense: dict[str, tuple[int, int]], current: dict[str, tuple[int, int]], fmt: str = "github") -> str:
    """Per layer: dense and current FLOPs and parameters, and the percentage kept
    (a layer missing from ``current`` was removed)."""
    return tabulate(_rows(dense, current), headers=["layer", "FLOPs dense", "FLOPs now", "%", "params dense", "params now", "%"],
                    tablefmt=fmt, intfmt=",")


def plot_costs(dense: dict[str, tuple[int, int]], current: dict[str, tuple[int, int]], path: str | os.PathLike,
               title: str = "") -> Path:
    """Two bar charts, FLOPs and parameters per layer, dense (light) behind now (dark)."""
    path = writable(path, "the cost picture")
    from matplotlib.figure import Figure  # no pyplot: the process-wide backend stays the user's

    names = list(dense)
    fig = Figure(figsize=(11, 1.2 + 0.22 * len(names)))
    axes = fig.subplots(1, 2, sharey=True)
    ys = range(len(names))
    for ax, i, label in ((axes[0], 0, "forward FLOPs per example"), (axes[1], 1, "parameters")):
        ax.barh(ys, [dense[n][i] for n in names], color="#c7d7ea", label="dense")
        ax.barh(ys, [current.get(n, (0, 0))[i] for n in names], color="#2b6cb0", label="after pruning")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(ys), names, fontsize=7)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
