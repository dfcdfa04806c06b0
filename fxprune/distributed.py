"""Training with live removal under ``torch.distributed``.

* :class:`DistributedDataParallel` wraps a gated model the way
  ``torch.nn.parallel.DistributedDataParallel`` does, and re-creates that wrapper after
  every live removal (DDP's reducer holds the parameters' old shapes); with no process
  group it calls the gated model directly.
* Under an initialised process group the :class:`~fxprune.Pruner` averages the theta
  gradients every step (one all-reduce of the gate count), samples gates with a
  generator of its own rank, takes every removal decision on rank 0 and broadcasts it,
  and refuses, with the same error on every rank, thetas that differ between ranks.
  ``convert`` takes the buffers (BatchNorm statistics) of rank 0, and checkpoints are
  written by rank 0 alone.
* A removal under a process group without this wrapper, and a model sharded with FSDP
  (whose parameters are DTensors), are refused with what to use instead.

Example (``torchrun --nproc_per_node 2 examples/distributed.py``)::

    >>> gated = fxprune.prepare(model, (x,), config)
    >>> ddp = fxprune.DistributedDataParallel(gated)
    >>> optimizer = torch.optim.SGD(gated.parameters(), lr=0.05)
    >>> pruner = fxprune.Pruner(gated, optimizer)
    >>> loss = F.cross_entropy(ddp(x), y) + pruner.penalty()      # then as usual
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn

from .passes.insert_gates import BANK, LAYERS, READS
from .state import state_of

__all__ = ["DistributedDataParallel", "active", "rank", "check_shardable", "average_", "broadcast_",
           "require_wrapper", "sync_buffers", "same_everywhere", "same_config", "rank_generator"]

#: the attribute of a gated model naming the fxprune wrapper it trains under
_WRAPPED = "_fxprune_ddp"


def active() -> bool:
    """A process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class DistributedDataParallel(nn.Module):
    """``torch.nn.parallel.DistributedDataParallel`` for a gated model, re-created after
    every live removal; ``ddp_kwargs`` go to it each time (DDP's checks stay on: no
    ``find_unused_parameters`` needed). Without a process group, a plain call of the
    gated model. The gated model is ``self.module``, as with DDP."""

    def __init__(self, gated: fx.GraphModule, **ddp_kwargs: Any) -> None:
        super().__init__()
        state_of(gated)
        check_shardable(gated)
        self.module = gated
        self.ddp_kwargs = ddp_kwargs
        self._version: int | None = None
        self._ddp: nn.Module | None = None
        #: how many times the inner DDP was built (once at the start, then once per removal), and how long each took
        self.rewraps, self.rewrap_seconds = 0, []
        object.__setattr__(gated, _WRAPPED, self)
        self._wrap()

    def _wrap(self) -> None:
        state = state_of(self.module)
        self._version = state.version
        self._ddp = None  # the old reducer goes first: it holds hooks on the old parameters
        if not (dist.is_available() and dist.is_initialized()):
            return
        ignore = [n for n, _ in [*self.module.named_parameters(), *self.module.named_buffers()]
                  if n.split(".")[0] in (BANK, READS, LAYERS)]  # gates: the pruner keeps them equal
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.module, ignore)
        t0 = time.perf_counter()
        ddp = nn.parallel.DistributedDataParallel(self.module, **self.ddp_kwargs)
        object.__setattr__(self, "_ddp", ddp)  # not a submodule: the gated model is registered once
        self.rewraps += 1
        self.rewrap_seconds.append(time.perf_counter() - t0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if state_of(self.module).version != self._version:
            self._wrap()
        return self._ddp(*args, **kwargs) if self._ddp is not None else self.module(*args, **kwargs)


def check_forward(gated: nn.Module) -> None:
    """Refuse a gated model whose ``forward`` was replaced on the instance (accelerate's
    mixed precision wraps it so): that wrapper holds the graph's code as it was, and a
    live removal recompiles the graph, so the model would run stale code."""
    if "forward" in vars(gated):
        raise RuntimeError(
            f"the gated model's forward was patched on the instance ({getattr(vars(gated)['forward'], '__qualname__', '?')}"
            "), as accelerate's mixed precision does: after a live removal that patch would run the graph's old "
            "code. Keep the model unpatched (accelerator.prepare the optimizer and data loaders, not the model, "
            "or Accelerator(mixed_precision='no')) and run the forward under accelerator.autocast()")


def check_shardable(gated: nn.Module) -> None:
    """Refuse a model sharded with FSDP (1 or 2): live removal slices whole tensors."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    fsdp1 = any(isinstance(m, FullyShardedDataParallel) for m in gated.modules())
    fsdp2 = any(isinstance(p, DTensor) for p in gated.parameters())
    if fsdp1 or fsdp2:
        raise TypeError(
            f"the gated model is sharded with FSDP{'1' if fsdp1 else '2'}: fxprune cannot remove structures from "
            "sharded parameters. Train with fxprune.DistributedDataParallel(gated) (each process holds the whole "
            "model), or prune on one process and fine-tune the compact model with FSDP afterwards")


def require_wrapper(gated: fx.GraphModule) -> None:
    """Refuse a live removal under a process group unless ``gated`` trains through
    :class:`DistributedDataParallel` (a plain DDP wrapper breaks at the next step)."""
    if active() and getattr(gated, _WRAPPED, None) is None:
        raise RuntimeError(
            "live removal under torch.distributed needs the gated model wrapped in fxprune.DistributedDataParallel("
            "gated, ...): torch's DistributedDataParallel keeps the parameters' old shapes and fails (or, with "
            "find_unused_parameters=True, stops averaging the sliced parameters) after a removal")


def average_(t: Tensor) -> Tensor:
    """All-reduce ``t`` to its mean over the processes, in place."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """``t`` from process ``src`` on every process, in place."""
    if active():
        dist.broadcast(t, src)
    return t


def _min_max(t: Tensor) -> tuple[Tensor, Tensor]:
    """The element-wise minimum and maximum of ``t`` over every process."""
    low, high = t.clone(), t.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return low, high


def same_everywhere(t: Tensor, what: str) -> None:
    """Raise, on every process alike, if ``t`` differs between processes."""
    if not active():
        return
    low, high = _min_max(t.detach().float())
    gap = float((high - low).abs().max()) if t.numel() else 0.0
    if gap > 0:
        raise RuntimeError(
            f"the {what} differ between processes (largest difference {gap:.3g}): every process must train the same "
            "gated model with the same config; average theta gradients through fxprune (train through "
            "fxprune.DistributedDataParallel and call pruner.step() on every process)")


def same_config(config: Any) -> None:
    """Raise, on every process alike, naming the fields, if the dataclass ``config``
    differs between processes (a ``gamma`` would be averaged silently, a ``check_every``
    would leave ranks waiting at different collectives until the process-group timeout)."""
    if not active():
        return
    names = [f.name for f in dataclasses.fields(config)]
    values = torch.tensor([float(zlib.crc32(repr(getattr(config, n)).encode())) for n in names], dtype=torch.float64)
    low, high = _min_max(values)
    differ = [n for n, a, b in zip(names, low.tolist(), high.tolist()) if a != b]
    if differ:
        raise RuntimeError(
            f"PruneConfig differs between processes in {', '.join(differ)} (this process, rank {rank()}: "
            f"{', '.join(f'{n}={getattr(config, n)!r}' for n in differ)}): every process must prune with the same "
            "config, so give every rank the same values")


def sync_buffers(gated: nn.Module, src: int = 0) -> None:
    """Every buffer (BatchNorm statistics) from process ``src`` (before ``convert``)."""
    if active():
        for b in gated.buffers():
            dist.broadcast(b, src)


def rank_generator(device: torch.device) -> torch.Generator | None:
    """A generator for this process's gate samples (seeded by the global seed and the
    rank, so processes sample independently), or None without a process group."""
    if not active():
        return None
    g = torch.Generator(device=device)
    g.manual_seed(torch.initial_seed() + 7919 * rank())
    return g

