"""A plain training loop on the digits data, dense or pruning while training.

``fit(model, epochs, config)`` trains ``model`` with Adam; with a ``PruneConfig`` it
prepares the gates, runs the :class:`~fxprune.Pruner` next to the optimizer and returns
the compact model. Dense training uses the same loss, optimizer and the same L2 term
(``lam1``) as the slab of the pruning objective, so the two differ only by the method.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..api import convert, prepare
from ..config import PruneConfig
from ..cost import forward_flops
from ..objective import prior_exempt
from ..passes import ChannelGraph
from ..pruner import Pruner
from ..state import decisions, gate_bank, state_of
from .data import loaders

__all__ = ["Run", "fit", "reinitialised", "seeded_digits", "make_optimizer", "make_schedule", "train_epochs", "accuracy", "widths", "theta_undecided",
           "gate_count"]


@dataclass
class Run:
    """What one training run ends with."""

    model: nn.Module
    accuracy: float  # test accuracy, percent
    params: int
    flops: int  # forward FLOPs per example
    dense_params: int
    dense_flops: int
    widths: list[int]
    train_flops_ratio: float = 1.0  # cumulative training FLOPs over dense training's
    undecided: float = 0.0  # fraction of the prepared model's gates with theta in (0.01, 0.99) at the end
    layers_removed: int = 0
    layers_total: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    gated: fx.GraphModule | None = None  # the gated model at the end of training (pruned runs)
    dense_graph: ChannelGraph | None = None  # the analysis of the dense model (pruned runs)


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was)
    return 100.0 * correct / total


def widths(model: nn.Module) -> list[int]:
    """Output widths of the conv and linear layers, in the order they run for a GraphModule
    (module order otherwise): the classifier is last."""
    mods = ([model.get_submodule(n.target) for n in model.graph.nodes if n.op == "call_module"]
            if isinstance(model, fx.GraphModule) else list(model.modules()))
    return [m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            for m in mods if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]


def reinitialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` (a compact model, say) with every parameter drawn afresh as its
    module's constructor draws it (``reset_parameters``) and norm statistics reset: the
    same architecture, trained from scratch by the caller. A parameter no module resets (a
    class token, a layer scale) cannot be drawn as its constructor would: ``ValueError``
    naming it."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    covered = set()
    for mod in fresh.modules():
        if hasattr(mod, "reset_running_stats"):
            mod.reset_running_stats()
        if callable(getattr(mod, "reset_parameters", None)):
            mod.reset_parameters()
            covered.update(id(p) for p in mod.parameters(recurse=False))
    missed = [name for name, p in fresh.named_parameters() if id(p) not in covered]
    if missed:
        raise ValueError(f"reinitialised: no module re-draws parameter(s) {', '.join(missed)}; "
                         "their initial distribution is unknown, so the model cannot be re-initialised")
    return fresh


def gate_count(gated: fx.GraphModule) -> int:
    """Number of unit and layer gates ``gated`` has now."""
    return gate_bank(gated).theta.numel()


def theta_undecided(gated: fx.GraphModule, low: float = 0.01, high: float = 0.99, total: int | None = None) -> float:
    """Fraction of gates whose theta lies strictly in (low, high). ``total`` is the number
    of gates the model was prepared with (default: the remaining ones); a gate removed
    during training counts as decided, at 0, since its structure is gone."""
    t = gate_bank(gated).theta.detach()
    total = total or t.numel()
    if not total:
        return 0.0
    return ((t > low) & (t < high)).sum().item() / total


def _l2(params, lam1: float) -> Tensor:
    return 0.5 * lam1 * sum(p.pow(2).sum() for p in params)


def train_epochs(model: nn.Module, loader, epochs: int, optimizer: torch.optim.Optimizer, lam1: float,
                 after_step: Callable[[], object] | None = None, loss_extra: Callable[[], Tensor] | None = None,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
                 exempt: tuple[str, ...] = ()) -> float:
    """``epochs`` passes of cross-entropy (+ ``loss_extra()``, default the L2 term on the
    parameters not of the ``exempt`` kinds of ``PruneConfig.prior_exempt``: by default
    every parameter, as the digits grid's fixed-strength recipes decay them) over
    ``loader``, stepping ``schedule`` after every optimizer step; returns the mean loss of
    the last pass."""
    model.train()
    decayed = [p for n, p in model.named_parameters() if p.requires_grad and n not in prior_exempt(model, exempt)]
    extra = loss_extra or (lambda: _l2(decayed, lam1))
    total = count = 0
    for _ in range(epochs):
        total = count = 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + extra()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if after_step is not None:
                after_step()
            total, count = total + loss.item(), count + 1
    return total / max(count, 1)


def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    """``"adam"`` (Adam), ``"adamw"`` (AdamW with its default weight decay 0.01) or ``"sgd"``
    (SGD with momentum 0.9 and Nesterov)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {name!r}")


def make_schedule(optimizer: torch.optim.Optimizer, name: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``"constant"`` (None) or ``"cosine"``: the learning rate falls from its start to 0
    over ``steps`` optimizer steps (``CosineAnnealingLR``)."""
    if name == "constant":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {name!r}")


def seeded_digits(model: nn.Module, seed: int, batch_size: int = 64, image: bool = True, dataset: str = "digits"):
    """Seed torch and numpy, and return the loaders of ``dataset``, one training batch, and
    the dense parameter count and forward FLOPs per example of ``model``: the start of every run."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    train, test = loaders(dataset, batch_size, seed=seed, image=image)
    batch = next(iter(train))[0]
    return train, test, batch, sum(p.numel() for p in model.parameters()), forward_flops(model, (batch[:1],))


def fit(model: nn.Module, epochs: int, config: PruneConfig | None = None, *, seed: int = 0, lr: float = 1e-3,
        optimizer: str = "adam", schedule: str = "constant", image: bool = True, batch_size: int = 64,
        lam1: float = 5e-4, on_epoch: Callable[[dict], None] | None = None, dataset: str = "digits") -> Run:
    """Train ``model`` on digits for ``epochs``: dense when ``config`` is None, else pruning
    while training with ``config`` (its ``lam1`` replaces ``lam1``). ``schedule`` is the weights'
    learning-rate schedule over the whole run (``"constant"`` or ``"cosine"``). ``on_epoch`` gets, after
    every epoch, the epoch's mean loss, the test accuracy and (pruned runs) the live model's
    parameter and FLOPs fractions."""
    train, test, batch, dense_params, dense_flops = seeded_digits(model, seed, batch_size, image, dataset)
    t0 = time.perf_counter()
    if config is None:
        opt = make_optimizer(model.parameters(), optimizer, lr)
        sched = make_schedule(opt, schedule, epochs * len(train))
        for epoch in range(epochs):
            loss = train_epochs(model, train, 1, opt, lam1, schedule=sched)
            if on_epoch is not None:
                on_epoch({"epoch": epoch + 1, "loss": loss, "accuracy": accuracy(model, test), "params": 1.0, "flops": 1.0})
        return Run(model.eval(), accuracy(model, test), dense_params, dense_flops, dense_params, dense_flops,
                   widths(model), seconds=time.perf_counter() - t0)

    if config.total_steps is None:  # a fractional warm-up is taken of the whole run
        config = replace(config, total_steps=epochs * len(train))
    gated = prepare(model, (batch,), config)
    dense_graph = state_of(gated).graph
    opt = make_optimizer(gated.parameters(), optimizer, lr)
    pruner = Pruner(gated, opt)
    sched = make_schedule(opt, schedule, epochs * len(train))
    layers_total, gates_total = len(state_of(gated).layout.layers), gate_count(gated)
    for epoch in range(epochs):
        loss = train_epochs(gated, train, 1, opt, config.lam1, after_step=pruner.step, loss_extra=pruner.penalty,
                            schedule=sched)
        if on_epoch is not None:
            on_epoch({"epoch": epoch + 1, "loss": loss, "accuracy": accuracy(gated, test),
                      "params": sum(p.numel() for p in gated.parameters()) / dense_params,
                      "flops": pruner.live_flops / dense_flops})
    undecided = theta_undecided(gated, total=gates_total)
    compact = convert(gated.eval()).eval()
    layers_left = len(state_of(gated).layout.layers) - len(decisions(gated)[1])
    return Run(
        compact, accuracy(compact, test), sum(p.numel() for p in compact.parameters()), forward_flops(compact, (batch[:1],)),
        dense_params, dense_flops, widths(compact), pruner.training_flops_ratio(), undecided,
        layers_total - layers_left, layers_total, time.perf_counter() - t0, pruner.removals, gated, dense_graph,
    )
