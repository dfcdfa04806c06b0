"""Property: training goes on through live removals forced at random steps, for random
networks of the grammar, random optimizers and random parameter groups. After every
removal the deterministic model computes what it did, every gradient and optimizer state
entry has its parameter's shape, and the optimizer holds exactly the live parameters."""

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netgen import networks

import fxprune
from fxprune.state import gate_bank, state_of

OPTIMIZERS = {
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=0.02, momentum=0.9),
    "sgd-nesterov": lambda groups: torch.optim.SGD(groups, lr=0.02, momentum=0.9, nesterov=True),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-3),
    "adamw-amsgrad": lambda groups: torch.optim.AdamW(groups, lr=1e-3, amsgrad=True, weight_decay=0.0),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=1e-3, momentum=0.5),
}


def check_invariants(gated, opt):
    live = {id(p) for p in gated.parameters()}
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(set(held)) and set(held) == live, "the optimizer holds exactly the live parameters"
    for p in gated.parameters():
        assert p.grad is None or p.grad.shape == p.shape
        for key, value in opt.state[p].items():
            assert not torch.is_tensor(value) or value.dim() == 0 or value.shape == p.shape, key
    state_of(gated).graph.check()


def forced_removal(gated, rng):
    """Switch off a random share of every gated group's units and maybe one branch; the
    structures to remove (their thetas at 0, so the function must not change)."""
    layout, theta = state_of(gated).layout, gate_bank(gated).theta
    units = {}
    with torch.no_grad():
        for g, sl in layout.units.items():
            n = sl.stop - sl.start
            drop = rng.random(n) < rng.uniform(0.1, 0.6)
            if drop.any():
                theta[sl][torch.as_tensor(drop)] = 0.0
                units[g] = drop
        layers = set()
        if layout.layers and rng.random() < 0.5:
            b = int(rng.choice(sorted(layout.layers)))
            theta[layout.layers[b]] = 0.0
            layers.add(b)
    return units, layers


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=networks(), opt_name=st.sampled_from(sorted(OPTIMIZERS)), groups=st.integers(1, 3),
       removal_steps=st.sets(st.integers(0, 5), min_size=1, max_size=3), set_to_none=st.booleans(),
       seed=st.integers(0, 2**16))
def test_training_continues_through_random_removals(net, opt_name, groups, removal_steps, set_to_none, seed):
    model, x = net
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gated = fxprune.prepare(model, (x,), fxprune.PruneConfig("both", check_every=10**6))
    if not state_of(gated).layout.size:
        return  # nothing to gate in this network
    params = list(gated.parameters())
    owner = rng.integers(0, groups, len(params))
    param_groups = [{"params": [p for p, o in zip(params, owner) if o == k], "lr": float(rng.uniform(1e-4, 1e-2))}
                    for k in range(groups)]
    opt = OPTIMIZERS[opt_name]([g for g in param_groups if g["params"]])
    pruner = fxprune.Pruner(gated, opt)
    target = torch.randn_like(model(x).detach())
    for step in range(6):
        gated.train()
        loss = F.mse_loss(gated(x), target) + pruner.penalty()
        opt.zero_grad(set_to_none=set_to_none)
        loss.backward()
        opt.step()
        pruner.step()
        assert torch.isfinite(loss)
        if step in removal_steps:
            units, layers = forced_removal(gated, rng)
            with torch.no_grad():
                before = gated.eval()(x)
            sizes = {g: sl.stop - sl.start for g, sl in state_of(gated).layout.units.items()}
            record = pruner.remove(units, layers)
            with torch.no_grad():
                after = gated.eval()(x)
            assert ((after - before).abs().max() / before.abs().max().clamp_min(1e-12)).item() <= 1e-4
            layout = state_of(gated).layout
            for g, n in record.units.items():  # the record says what went
                assert g not in layout.units or layout.units[g].stop - layout.units[g].start <= sizes[g] - n
            check_invariants(gated, opt)
    compact = fxprune.convert(gated.eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
