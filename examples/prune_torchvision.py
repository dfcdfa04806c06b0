"""Prune a torchvision model while training it in your own loop, with a checkpoint you can
resume from, then save the compact model.

Here the data are the built-in digits, upscaled to 32x32 RGB; put your own DataLoader in
their place.

    python examples/prune_torchvision.py [--model resnet18] [--epochs 4] [--out out/prune_torchvision]
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.checkpoint import load_checkpoint, save_checkpoint
from fxprune.digits.data import digits
from fxprune.digits.training import accuracy
from fxprune.export import save_compact

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="resnet18")
p.add_argument("--epochs", type=int, default=4)
p.add_argument("--gamma", type=float, default=10.0)
p.add_argument("--out", default="out/prune_torchvision")
p.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
args = p.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)


def rgb32(x):  # [N, 1, 8, 8] -> [N, 3, 32, 32]
    return F.interpolate(x, size=32, mode="bilinear").expand(-1, 3, -1, -1).contiguous()


x_tr, y_tr, x_te, y_te = digits()
train = DataLoader(TensorDataset(rgb32(x_tr), y_tr), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
test = DataLoader(TensorDataset(rgb32(x_te), y_te), batch_size=256)

torch.manual_seed(0)
model = torchvision.models.get_model(args.model, num_classes=10)
config = fxprune.PruneConfig("both", gamma=args.gamma, theta_lr=0.5)
gated = fxprune.prepare(model, next(iter(train))[0], config)
optimizer = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)  # weight decay is the pruner's slab term
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
pruner = fxprune.Pruner(gated, optimizer)
start = 0
if args.resume:  # the same model, optimizer and pruner as at the start, then the checkpoint
    start = load_checkpoint(out / "last.ckpt", gated, optimizer, pruner, scheduler)["epoch"]

for epoch in range(start, args.epochs):
    gated.train()
    for x, y in train:
        loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()  # projected SGD on theta; removes structures from the live model
    scheduler.step()
    save_checkpoint(out / "last.ckpt", gated, optimizer, pruner, scheduler, epoch=epoch + 1)
    live = sum(p.numel() for p in gated.parameters()) / sum(p.numel() for p in model.parameters())
    print(f"epoch {epoch + 1}: test accuracy {accuracy(gated, test):.1f}%, live parameters {100 * live:.1f}%, "
          f"{len(pruner.removals)} removals so far")

compact = fxprune.convert(gated.eval()).eval()
paths = save_compact(compact, next(iter(test))[0][:1], out)
print(f"compact: {sum(p.numel() for p in compact.parameters()):,} parameters, test accuracy {accuracy(compact, test):.1f}%; "
      f"training FLOPs ratio {pruner.training_flops_ratio():.2f}; saved to {paths['pt2']}")
