"""The digits benchmark's per-model recipes: gate config, optimizer, learning rate,
schedule and epochs. The demo trains the ResNet entry; ``fxprune bench digits`` runs
them all against dense training and magnitude pruning."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import PruneConfig
from ..passes import residualize
from . import models
from .data import steps_per_epoch

__all__ = ["Experiment", "EXPERIMENTS", "ROBUSTNESS"]


@dataclass
class Experiment:
    """One benchmark entry: a model builder, its gate config and its training recipe."""

    name: str
    build: Callable[[], nn.Module]
    config: PruneConfig
    epochs: int
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "cosine"
    baseline: bool = True


def _residual_vgg() -> nn.Module:
    return residualize(models.vgg(), (torch.zeros(2, 1, 8, 8),))


#: the per-model choices (gamma, theta learning rate, cost warm-up, optimizer), in
#: fixed-strength mode with the weight condition of removal (``w_tol=0.1``) and no
#: sharpening or decision, as the digits benchmark measures them, and the weight prior on
#: every parameter (``prior_exempt=()``, as they were set); everything else is
#: PruneConfig's defaults. All use the balanced estimator and a cosine learning rate.
#: The LeNets' targets are parameters (beta=0 for LeNet-5, whose convolutions hold most
#: FLOPs but few parameters); the CNNs use SGD with momentum, their usual recipe.
_FIXED = dict(estimator="balanced", w_tol=0.1, sharpen=0.0, prior_exempt=())
EXPERIMENTS = [
    Experiment("LeNet-300-100", models.lenet_300_100,
               PruneConfig("units", gamma=16.0, theta_lr=2.0, warmup=30 * steps_per_epoch(), **_FIXED), 100),
    Experiment("LeNet-5", models.lenet5,
               PruneConfig("units", gamma=8.0, beta=0.0, theta_lr=1.0, warmup=20 * steps_per_epoch(), **_FIXED), 60, optimizer="sgd", lr=0.05),
    Experiment("VGG + residualize", _residual_vgg,
               PruneConfig("both", gamma=30.0, theta_lr=0.5, warmup=0, **_FIXED), 20, optimizer="sgd", lr=0.05),
    Experiment("ResNet 3x3 blocks", models.resnet,
               PruneConfig("both", gamma=30.0, theta_lr=0.5, warmup=0, **_FIXED), 20, optimizer="sgd", lr=0.05),
]


#: the robustness table's priors, on LeNet-300-100 with its recipe: paper A's flat prior
#: (``cost="gates"``: every unit priced 0.02 of task loss, whatever the model's size, so no
#: reference is needed) and paper C's complexity prior (the comparison table's, normalised
#: by the x1 model's cost).
ROBUSTNESS = {
    "gates": replace(EXPERIMENTS[0].config, cost="gates", gamma=0.02),
    "complexity": EXPERIMENTS[0].config,
}
