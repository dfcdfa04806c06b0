"""Optimizers fxprune has no declared layout for: any optimizer whose per-parameter state
tensors have the parameter's shape (sliced like it) and whose other state is scalar (kept)
trains through live removals without registration (timm's Lamb, Lion, Adan, Adopt, NAdamW,
SGDP, torch's Adamax, NAdam, RAdam, Rprop, ASGD); state of any other shape (Adafactor's
factored moments) is refused at the removal, naming the optimizer and the entry, before
anything changes; and an optimizer wrapper holding the real one in ``.optimizer``
(accelerate's AcceleratedOptimizer, which Trainer callbacks receive) is accepted."""

import numpy as np
import pytest
import torch
from test_live_removal import assert_same, first_group, readme_loop, snapshot, switch_off_two
from train_loop import MLP

import fxprune
from fxprune import optim_state
from fxprune.state import UnitGate, theta_of


def timm_optimizer(name):
    def make(params):
        import timm.optim

        return getattr(timm.optim, name)(params, lr=1e-2)
    return make


GENERIC = {
    **{name: timm_optimizer(name) for name in ("Lamb", "Lion", "Adan", "Adopt", "NAdamW", "SGDP")},
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "Rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-2),
    "ASGD": lambda ps: torch.optim.ASGD(ps, lr=1e-2),
}


def trained(make, steps=3):
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig("units", check_every=10**6))
    opt = make(list(gated.parameters()))
    pruner = fxprune.Pruner(gated, opt)
    readme_loop(gated, opt, pruner, x, y, steps)
    return gated, opt, pruner, x, y


@pytest.mark.parametrize("name", list(GENERIC))
def test_an_optimizer_with_parameter_shaped_state_trains_through_removals_without_registration(name):
    gated, opt, pruner, x, y = trained(GENERIC[name])
    w = gated.get_submodule("layers.0").weight
    shaped = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v) and v.shape == w.shape}
    kept = {k: v for k, v in opt.state[w].items() if k not in shaped}
    assert shaped, f"{name} keeps per-element state"
    switch_off_two(gated, pruner)
    assert w.shape == (10, 6)
    for k, v in shaped.items():
        torch.testing.assert_close(opt.state[w][k], v[2:])
    for k, v in kept.items():  # scalar state stays as it was
        assert opt.state[w][k] is v or torch.equal(torch.as_tensor(opt.state[w][k]), torch.as_tensor(v))
    losses = readme_loop(gated, opt, pruner, x, y, 3)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_state_of_another_shape_is_refused_by_name_before_anything_changes():
    gated, opt, pruner, x, y = trained(lambda ps: torch.optim.Adafactor(ps, lr=1e-2))
    gid = first_group(gated)
    with torch.no_grad():
        theta_of(gated, UnitGate(gid))[:2] = 0.0
    before = snapshot(gated, opt)
    with pytest.raises(optim_state.UnsupportedOptimizer, match=r"Adafactor.*'(row|col)_var'.*register_optimizer"):
        pruner.remove({gid: np.arange(12) < 2}, set())
    assert_same(snapshot(gated, opt), before)


def test_an_accelerate_optimizer_is_accepted_and_trains_through_removals():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig("units", check_every=10**6))
    accelerator = accelerate.Accelerator(cpu=True)
    opt = accelerator.prepare_optimizer(torch.optim.AdamW(gated.parameters(), lr=1e-2, weight_decay=0.0))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    pruner = fxprune.Pruner(gated, opt)
    readme_loop(gated, opt, pruner, x, y, 3)
    w = gated.get_submodule("layers.0").weight
    moment = opt.optimizer.state[w]["exp_avg"].clone()
    switch_off_two(gated, pruner)
    torch.testing.assert_close(opt.optimizer.state[w]["exp_avg"], moment[2:])
    readme_loop(gated, opt, pruner, x, y, 3)
    assert pruner.steps == 6 and pruner._optimizer_steps == 0  # its step hooks see the wrapped steps


def test_a_forward_patched_on_the_instance_is_refused_before_it_runs_stale_code():
    """accelerate's mixed precision wraps ``model.forward`` on the instance: after a live
    removal recompiles the graph, that wrapper still ran the old code (a branch removal
    failed in its own check, unit removals ended in a CompactionError at convert). The
    Pruner refuses such a model, and so does a removal when the patch came later, naming
    what to do, before anything changes."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig("units", check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1)
    pruner = fxprune.Pruner(gated, opt)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one state per process; its tests reset it
    try:
        accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        refused_with_a_patched_forward(accelerator, gated, opt, pruner, x)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def refused_with_a_patched_forward(accelerator, gated, opt, pruner, x):
    patched = accelerator.prepare_model(gated)
    assert patched is gated and "forward" in gated.__dict__
    gid = first_group(gated)
    with torch.no_grad():
        theta_of(gated, UnitGate(gid))[:2] = 0.0
    before = snapshot(gated, opt)
    with pytest.raises(RuntimeError, match="forward.*patched on the instance.*accelerator.autocast"):
        pruner.remove({gid: np.arange(12) < 2}, set())
    assert_same(snapshot(gated, opt), before)
    other = accelerator.prepare_model(fxprune.prepare(MLP(), (x,)))  # patched before its Pruner is built
    with pytest.raises(RuntimeError, match="forward.*patched on the instance"):
        fxprune.Pruner(other, torch.optim.SGD(other.parameters(), lr=0.1))
