"""The prune-while-training step the tests share: task loss plus the pruner's penalty,
optimizer step, scheduler step (if one is given), then the pruner's step; and the small
MLP several tests train."""

import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, widths=(6, 12, 10, 3)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def train_steps(model, opt, pruner, batches, sched=None) -> list[float]:
    """One step per ``(x, y)`` in ``batches``; ``model`` is the gated model or a compiled
    wrapper of it. Returns the loss of every step."""
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        pruner.step()
        losses.append(loss.item())
    return losses
