"""Prune while training, in your own loop: LeNet-300-100 on the built-in digits data.

    python examples/prune_while_training.py [--epochs 30] [--target-flops 0.25]

A FLOPs budget and the length of training are all the configuration it needs.
"""

import argparse

import torch
import torch.nn.functional as F

import fxprune
from fxprune.digits.data import digits_loaders
from fxprune.digits.models import lenet_300_100
from fxprune.digits.training import accuracy

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--epochs", type=int, default=30)
p.add_argument("--target-flops", type=float, default=0.25, help="the budget: a fraction of the dense model's FLOPs")
args = p.parse_args()

torch.manual_seed(0)
train, test = digits_loaders(batch_size=64, seed=0)
model = lenet_300_100()
config = fxprune.PruneConfig(target_flops=args.target_flops, total_steps=args.epochs * len(train))
gated = fxprune.prepare(model, next(iter(train))[0], config)
optimizer = torch.optim.Adam(gated.parameters(), lr=1e-3)  # weight decay is the pruner's slab term
pruner = fxprune.Pruner(gated, optimizer)

for epoch in range(args.epochs):
    for x, y in train:
        loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()  # projected SGD on theta; removes structures from the live model
    if epoch % 5 == 4 or epoch == args.epochs - 1:
        widths = [m.out_features for m in gated.modules() if isinstance(m, torch.nn.Linear)]
        print(f"epoch {epoch + 1}: widths {widths}, test accuracy {accuracy(gated, test):.1f}%")

compact = fxprune.convert(gated.eval())
print(f"parameters {sum(p.numel() for p in model.parameters()):,} at the start, "
      f"{sum(p.numel() for p in compact.parameters()):,} now; training FLOPs ratio {pruner.training_flops_ratio():.2f}")
