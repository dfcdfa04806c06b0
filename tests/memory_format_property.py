"""Property, run in its own process (a heap corruption aborts the process, not the test
run): random networks of the grammar train on inputs of random memory formats
(contiguous, channels_last, an NHWC tensor read as NCHW, changing from step to step)
through random live removals, with SGD momentum, and the deterministic model computes
what it did after every removal. Prints 'ok' and the number of examples that removed
something; hypothesis prints the failing example on a failure."""

import sys

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netgen import networks
from test_training_property import check_invariants, forced_removal

import fxprune
from fxprune.state import state_of

FORMATS = ("contiguous", "channels_last", "permuted")
removed = 0


def in_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if fmt == "permuted":  # the usual image-loading pattern: NHWC data permuted to NCHW
        return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return x


def run(examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(net=networks(), formats=st.lists(st.sampled_from(FORMATS), min_size=8, max_size=8),
           removal_steps=st.sets(st.integers(0, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
    def trains(net, formats, removal_steps, seed):
        global removed
        model, x = net
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        accepted = set()
        for fmt in FORMATS:  # a network that views its input accepts only the formats plain torch does
            try:
                model(in_format(x, fmt))
                accepted.add(fmt)
            except RuntimeError:
                pass
        formats = [f if f in accepted else "contiguous" for f in formats]
        gated = fxprune.prepare(model, (x,), fxprune.PruneConfig("both", check_every=10**6))
        if not state_of(gated).layout.size:
            return
        opt = torch.optim.SGD(gated.parameters(), lr=0.02, momentum=0.9)
        pruner = fxprune.Pruner(gated, opt)
        target = torch.randn_like(model(x).detach())
        did = False
        for step, fmt in enumerate(formats):
            gated.train()
            loss = F.mse_loss(gated(in_format(x, fmt)), target) + pruner.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            del loss
            pruner.step()
            if step in removal_steps:
                units, layers = forced_removal(gated, rng)
                with torch.no_grad():
                    before = gated.eval()(in_format(x, fmt))
                did |= pruner.remove(units, layers) is not None
                with torch.no_grad():
                    after = gated.eval()(in_format(x, formats[-1 - step]))
                assert ((after - before).abs().max() / before.abs().max().clamp_min(1e-12)).item() <= 1e-4
                check_invariants(gated, opt)
        removed += did

    trains()
    print("ok", removed, flush=True)


if __name__ == "__main__":
    run(int(sys.argv[1]))
