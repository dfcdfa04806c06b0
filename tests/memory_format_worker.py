"""Trains the digits ResNet through live removals on inputs of one memory format, in its
own process (a heap corruption aborts the process, not the test run): the removals switch
off random units and branches every few steps. Prints 'ok' and the removal count."""

import sys

import numpy as np
import torch
import torch.nn.functional as F

import fxprune
from fxprune.digits.models import resnet
from fxprune.state import gate_bank, state_of


def batch(fmt: str, g: torch.Generator) -> torch.Tensor:
    if fmt == "permuted":  # an NHWC tensor read as NCHW, the usual image-loading pattern
        return torch.randn(16, 8, 8, 1, generator=g).permute(0, 3, 1, 2)
    x = torch.randn(16, 1, 8, 8, generator=g)
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x


def main(fmt: str, seed: int, compiled: bool, steps: int) -> None:
    torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (torch.randn(4, 1, 8, 8),),
                            fxprune.PruneConfig("both", gamma=1.0, check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    model = torch.compile(gated) if compiled else gated
    removals = 0
    for step in range(steps):
        loss = F.cross_entropy(model(batch(fmt, g)), torch.randint(0, 10, (16,), generator=g)) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        del loss  # as in the reproduction: no graph of the last step alive at the removal
        pruner.step()
        if step % 3 != 2:
            continue
        layout = state_of(gated).layout
        units = {}
        for gid, sl in layout.units.items():
            if sl.stop - sl.start > 2 and rng.random() < 0.5:
                units[gid] = np.isin(np.arange(sl.stop - sl.start), rng.choice(sl.stop - sl.start, 1))
        layers = {b for b in layout.layers if rng.random() < 0.1}
        with torch.no_grad():
            theta = gate_bank(gated).theta
            for gid, drop in units.items():
                theta[layout.units[gid].start + np.flatnonzero(drop)] = 0.0
            for b in layers:
                theta[layout.layers[b]] = 0.0
        if units or layers:
            pruner.remove(units, layers)
            removals += 1
    print("ok", removals, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "compiled", int(sys.argv[4]))
