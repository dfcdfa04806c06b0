"""Fine-tune a trained torchvision model to a FLOPs budget in your own loop, with a checkpoint
you can resume from, then save the compact model.

The starting weights are a state dict you give (``--weights``, e.g. saved from
``torchvision.models.resnet18(weights="DEFAULT")`` on a machine with a network), or, offline,
a dense model trained here for ``--pretrain-epochs`` standing in for them. The data are the
built-in digits, upscaled to 32x32 RGB; put your own DataLoader in their place.

    python examples/prune_torchvision.py [--model resnet18] [--target-flops 0.5] [--epochs 4] [--out out/prune_torchvision]
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.checkpoint import load_checkpoint, save_checkpoint
from fxprune.cost import forward_flops
from fxprune.digits.data import digits
from fxprune.digits.training import accuracy
from fxprune.export import save_compact

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="resnet18")
p.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs, pruning to the budget")
p.add_argument("--target-flops", type=float, default=0.5, help="the budget: a fraction of the dense model's FLOPs")
p.add_argument("--weights", help="a state dict of the model to start from (default: train one here)")
p.add_argument("--pretrain-epochs", type=int, default=2, help="dense training standing in for --weights")
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
if args.weights:
    model.load_state_dict(torch.load(args.weights, weights_only=True))
elif not args.resume:
    dense_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(args.pretrain_epochs):
        model.train()
        for x, y in train:
            dense_opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            dense_opt.step()
    print(f"dense model trained for {args.pretrain_epochs} epochs: test accuracy {accuracy(model, test):.1f}%")
dense_params = sum(p.numel() for p in model.parameters())
# the budget, and the length of training so the budget is reached, and the gates decided, in time
config = fxprune.PruneConfig("both", target_flops=args.target_flops, total_steps=args.epochs * len(train))
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
    live = sum(p.numel() for p in gated.parameters()) / dense_params
    r = pruner.report()
    print(f"epoch {epoch + 1}: test accuracy {accuracy(gated, test):.1f}%, live parameters {100 * live:.1f}%, "
          f"expected FLOPs {r['flops']:.3f} (budget {args.target_flops:g}), {len(pruner.removals)} removals so far")

compact = fxprune.convert(gated.eval()).eval()
paths = save_compact(compact, next(iter(test))[0][:1], out)
flops = forward_flops(compact, (next(iter(test))[0][:1],)) / pruner.dense_flops
print(f"compact: {sum(p.numel() for p in compact.parameters()):,} parameters, FLOPs fraction {flops:.3f}, "
      f"test accuracy {accuracy(compact, test):.1f}%; training FLOPs ratio {pruner.training_flops_ratio():.2f}; "
      f"saved to {paths['pt2']}")
