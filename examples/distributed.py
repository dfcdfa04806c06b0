"""Prune while training on several processes: the digits ResNet under torch.distributed,
with live removal, through fxprune.DistributedDataParallel.

    torchrun --nproc_per_node 2 examples/distributed.py [--epochs 10] [--backend gloo]

Every process trains on its shard of the digits data; the gated model is wrapped in
fxprune.DistributedDataParallel, which re-creates torch's DDP after each removal; the
pruner averages the theta gradients and rank 0 decides the removals for all. Rank 0
prints the compact model's figures and writes the checkpoint. With one process (plain
`python examples/distributed.py`) it runs the same loop without a process group.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import fxprune
from fxprune.checkpoint import save_checkpoint
from fxprune.digits.data import digits
from fxprune.digits.models import resnet
from fxprune.digits.training import accuracy

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--gamma", type=float, default=30.0)
p.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (one GPU per process)")
p.add_argument("--out", default="out/distributed")
args = p.parse_args()

distributed = "WORLD_SIZE" in os.environ
if distributed:
    dist.init_process_group(args.backend)
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if args.backend == "nccl" else "cpu")
torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))

x_tr, y_tr, x_te, y_te = digits()
train_set = TensorDataset(x_tr, y_tr)
sampler = DistributedSampler(train_set, world, rank, seed=0) if distributed else None
train = DataLoader(train_set, batch_size=64 // world, sampler=sampler, shuffle=sampler is None)
test = DataLoader(TensorDataset(x_te, y_te), batch_size=512)

torch.manual_seed(0)  # the same initial model everywhere (DDP broadcasts rank 0's anyway)
config = fxprune.PruneConfig("both", gamma=args.gamma, theta_lr=0.5, estimator="balanced")
gated = fxprune.prepare(resnet(), (x_tr[:64],), config).to(device)
model = fxprune.DistributedDataParallel(gated)
optimizer = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
pruner = fxprune.Pruner(gated, optimizer)

step_times = []
for epoch in range(args.epochs):
    if sampler is not None:
        sampler.set_epoch(epoch)
    gated.train()
    for x, y in train:
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
        step_times.append(time.perf_counter() - t0)
    save_checkpoint(f"{args.out}/last.ckpt", gated, optimizer, pruner, epoch=epoch + 1)  # rank 0 writes
    if rank == 0:
        live = sum(p.numel() for p in gated.parameters())
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, {live:,} parameters, {len(pruner.removals)} removals, "
              f"DDP built {model.rewraps} times", flush=True)

compact = fxprune.convert(gated.eval())  # every rank: buffers come from rank 0
if rank == 0:
    step_ms = 1e3 * sorted(step_times)[len(step_times) // 2]
    rewraps = model.rewrap_seconds[1:]
    print(f"{world} process(es): median step {step_ms:.1f} ms; DDP rebuilt {len(rewraps)} times after removals"
          + (f", {1e3 * min(rewraps):.0f}-{1e3 * max(rewraps):.0f} ms each" if rewraps else "")
          + f"; compact model {sum(p.numel() for p in compact.parameters()):,} parameters, test accuracy "
          f"{accuracy(compact.to('cpu'), test):.1f}%")
if distributed:
    dist.destroy_process_group()
