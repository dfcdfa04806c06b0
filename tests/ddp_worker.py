"""One process of the two-process tests (tests/test_distributed.py): trains a gated digits
ResNet through fxprune.DistributedDataParallel with live removals, and records what the
test compares between ranks."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxprune
from fxprune.digits.models import resnet

CONFIG = fxprune.PruneConfig("both", gamma=200.0, theta_lr=2.0, check_every=2, patience=1, w_tol=None)


def _setup(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    return fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (torch.randn(4, 1, 8, 8),), CONFIG)


def _batches(rank: int, n: int):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as a DistributedSampler gives
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def train(rank: int, world: int, port: int, out: str) -> None:
    _setup(rank, world, port)
    try:
        record: dict = {}
        gated = _model()
        ddp = fxprune.DistributedDataParallel(gated)
        opt = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
        pruner = fxprune.Pruner(gated, opt)
        gated.train()
        thetas, times = [], []
        for x, y in _batches(rank, 12):
            t0 = time.perf_counter()
            loss = F.cross_entropy(ddp(x), y) + pruner.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()
            times.append(time.perf_counter() - t0)
            thetas.append(pruner.theta.detach().clone())
        record["thetas"] = thetas
        record["removals"] = [(r.step, r.units, r.layers) for r in pruner.removals]
        record["rewraps"] = ddp.rewraps
        record["params"] = {n: p.detach().clone() for n, p in gated.named_parameters()}
        record["compact"] = {k: v.clone() for k, v in fxprune.convert(gated.eval()).state_dict().items()}
        record["step_s"] = sorted(times)[len(times) // 2]

        # a process whose thetas went their own way: every rank refuses at the check
        if rank == 1:
            with torch.no_grad():
                pruner.theta[0] = 0.37
        try:
            pruner.check()
            record["mismatch"] = None
        except RuntimeError as exc:
            record["mismatch"] = str(exc)

        # a plain torch DDP wrapper: the removal is refused before anything changes
        plain_gated = _model()
        plain = torch.nn.parallel.DistributedDataParallel(plain_gated)
        plain_opt = torch.optim.SGD(plain_gated.parameters(), lr=0.05)
        plain_pruner = fxprune.Pruner(plain_gated, plain_opt)
        x, y = _batches(rank, 1)[0]
        (F.cross_entropy(plain(x), y) + plain_pruner.penalty()).backward()
        with torch.no_grad():
            fxprune.state.theta_of(plain_gated, fxprune.LayerGate(0)).zero_()
        try:
            plain_pruner.remove({}, {0})
            record["plain"] = None
        except RuntimeError as exc:
            record["plain"] = str(exc)

        # a config that differs between ranks: refused on both at the first step, naming the fields
        other = _model()
        other_opt = torch.optim.SGD(other.parameters(), lr=0.05)
        config = fxprune.PruneConfig("both", gamma=1.0 + rank, check_every=2 + rank)
        other_pruner = fxprune.Pruner(other, other_opt, config)
        (F.cross_entropy(fxprune.DistributedDataParallel(other)(x), y) + other_pruner.penalty()).backward()
        try:
            other_pruner.step()
            record["config"] = None
        except RuntimeError as exc:
            record["config"] = str(exc)
        torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
