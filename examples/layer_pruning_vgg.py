"""Layer pruning of a plain VGG: residualize wraps each conv-BN-ReLU in a shortcut, and
layer gates learn which whole sections to remove (units are pruned at the same time).

    python examples/layer_pruning_vgg.py --epochs 30
"""

import argparse

import torch

import fxprune
from fxprune.digits.models import vgg
from fxprune.digits.training import fit

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--epochs", type=int, default=30)
p.add_argument("--gamma", type=float, default=3.0)
args = p.parse_args()

model = fxprune.residualize(vgg(), torch.zeros(2, 1, 8, 8))
for s in model.meta["fxprune_residualize"].sections:
    print(f"section {' '.join(s.nodes)}: shortcut {s.shortcut}")
run = fit(model, args.epochs, fxprune.PruneConfig("both", gamma=args.gamma, theta_lr=0.5))
print(f"test accuracy {run.accuracy:.1f}%, sections removed {run.layers_removed}/{run.layers_total}, "
      f"FLOPs {run.flops / run.dense_flops:.2f} of dense, training FLOPs ratio {run.train_flops_ratio:.2f}")
print(run.model.code)
