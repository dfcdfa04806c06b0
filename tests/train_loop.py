"""The prune-while-training step the tests share: task loss plus the pruner's penalty,
optimizer step, scheduler step (if one is given), then the pruner's step."""

import torch.nn.functional as F


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
