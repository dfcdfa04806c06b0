"""Live removal as a state transition: every removal leaves a record (the state's
``removals``) that says how the flat thetas, the parameters and the buffers moved;
whatever is derived from the model (the pruner's counters, the objective's indices, the
live FLOPs) follows the record, whether the Pruner or ``live_compaction.remove`` made the
removal; and a follower that cannot follow undoes the removal."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_live_removal import assert_same, first_group, readme_loop, snapshot
from train_loop import MLP

import fxprune
from fxprune import live_compaction
from fxprune.digits.models import resnet
from fxprune.objective import Objective
from fxprune.state import LayerGate, UnitGate, gate_bank, state_of, theta_of


def trained_resnet(steps=3):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (x,), fxprune.PruneConfig(check_every=10**6))
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(gated, opt)
    readme_loop(gated, opt, pruner, x, y, steps)
    return gated, opt, pruner, x, y


def switch_off(gated, units=3, layer=0):
    gid = first_group(gated)
    theta = theta_of(gated, UnitGate(gid))
    with torch.no_grad():
        theta[:units] = 0.0
        theta_of(gated, LayerGate(layer)).zero_()
    drop = np.zeros(theta.numel(), dtype=bool)
    drop[:units] = True
    return {gid: drop}, {layer}


def fresh_penalty(gated):
    """The penalty an Objective built afresh on the model now computes."""
    return Objective(gated, state_of(gated).config).penalty(gamma=0.0)


def test_the_record_says_where_every_theta_entry_parameter_and_buffer_went():
    gated, opt, pruner, x, _ = trained_resnet()
    units, layers = switch_off(gated)
    before_layout = state_of(gated).layout
    theta_before = gate_bank(gated).theta.detach().clone()
    params_before = {k: v.detach().clone() for k, v in gated.state_dict().items()}
    record = pruner.remove(units, layers)
    state = state_of(gated)
    assert state.removals == [record] and record.version == state.version == 1
    assert record.before is before_layout and record.after is state.layout
    # theta_index: new entry i was old entry theta_index[i]
    torch.testing.assert_close(gate_bank(gated).theta.detach(), theta_before[torch.as_tensor(record.theta_index)])
    gid = next(iter(units))
    moved = record.index_map(UnitGate(gid))
    assert (moved[:3] == -1).all() and (moved[3:] >= 0).all()
    assert (record.index_map(LayerGate(0)) == -1).all()
    torch.testing.assert_close(gate_bank(gated).theta.detach()[moved[3:]],
                               theta_before[before_layout.slot(UnitGate(gid))][3:])
    # slices: applying them to the tensors before gives the tensors after
    after = gated.state_dict()
    assert record.slices
    for name, cuts in record.slices.items():
        t = params_before[name]
        for dim, kept in cuts:
            t = t.index_select(dim, torch.as_tensor(kept))
        torch.testing.assert_close(after[name], t, msg=name)
    assert record.deleted and all(n in params_before and n not in after for n in record.deleted)
    # the rest is as it was, but for fxprune's own gate reads, which index the new layout
    untouched = set(params_before) - set(record.slices) - set(record.deleted) - {"fxprune_gates.theta"}
    for name in {n for n in untouched & set(after) if not n.startswith("fxprune_reads.")}:
        if after[name].shape == params_before[name].shape:
            torch.testing.assert_close(after[name], params_before[name], msg=name)


def test_a_removal_made_outside_the_pruner_is_followed():
    gated, opt, pruner, x, y = trained_resnet()
    pruner.pruning.below[:] = np.arange(state_of(gated).layout.size) % 3  # counters to follow
    below_before = pruner.below.copy()
    units, layers = switch_off(gated)
    record = live_compaction.remove(gated, units, layers, opt)
    assert pruner.below.shape == (state_of(gated).layout.size,)
    np.testing.assert_array_equal(pruner.below, below_before[record.theta_index])
    assert pruner.live_flops == record.flops < pruner.dense_flops
    torch.testing.assert_close(pruner.penalty(), fresh_penalty(gated) + pruner.budget.penalty_value(pruner.steps))
    losses = readme_loop(gated, opt, pruner, x, y, 3)
    assert np.isfinite(losses).all() and pruner.removals == [record]


@pytest.mark.parametrize("where", ["hook", "objective"])
def test_a_follower_that_fails_undoes_the_removal(monkeypatch, where):
    gated, opt, pruner, x, y = trained_resnet()
    pruner.pruning.below[:] = 1
    units, layers = switch_off(gated)
    gated.eval()
    with torch.no_grad():
        out = gated(x)
    gated.train()
    before = snapshot(gated, opt)
    below, penalty, flops = pruner.below.copy(), pruner.penalty().detach(), pruner.live_flops
    if where == "hook":
        seen = []

        @pruner.on_removal
        def hook(record):
            seen.append(record)
            raise RuntimeError("injected failure")
    else:
        real = Objective.rebuild

        def rebuild(self):
            raise RuntimeError("injected failure")
        monkeypatch.setattr(Objective, "rebuild", rebuild)
    with pytest.raises(RuntimeError, match="injected failure"):
        pruner.remove(units, layers)
    if where == "hook":
        assert len(seen) == 1 and seen[0].version == 1  # called with the record, inside the transaction
        pruner._hooks.clear()
    else:
        monkeypatch.setattr(Objective, "rebuild", real)
    assert_same(snapshot(gated, opt), before)
    state = state_of(gated)
    assert state.version == 0 and state.removals == [] and pruner.removals == []
    np.testing.assert_array_equal(pruner.below, below)
    assert pruner.live_flops == flops
    torch.testing.assert_close(pruner.penalty().detach(), penalty)
    gated.eval()
    with torch.no_grad():
        torch.testing.assert_close(gated(x), out)
    gated.train()
    pruner.remove(units, layers)  # the same removal succeeds afterwards, and training goes on
    assert np.isfinite(readme_loop(gated, opt, pruner, x, y, 2)).all()


def test_hooks_see_every_removal_of_training_in_order():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(MLP(), (x,))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    seen = []
    pruner.on_removal(lambda r: seen.append((r.version, pruner.objective.theta().numel(), state_of(gated).layout.size)))
    for step in range(3):
        gid = first_group(gated)
        theta = theta_of(gated, UnitGate(gid))
        with torch.no_grad():
            theta[:1] = 0.0
        pruner.remove({gid: np.arange(theta.numel()) < 1}, set())
        loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    assert [v for v, _, _ in seen] == [1, 2, 3]
    assert all(n == size for _, n, size in seen)  # the objective followed before the hook ran
    assert [r.version for r in pruner.removals] == [1, 2, 3]


class OneBranch(torch.nn.Module):
    """Its only gates are one residual branch and the units inside it."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(4, 12, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(12, 4, 3, padding=1))
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x):
        h = self.stem(x)
        return self.head((h + self.body(h)).mean((2, 3)))


def test_training_goes_on_after_the_last_gate_was_removed():
    """Found by the memory-format property: once a removal took every gate, the budget's
    correction of the (empty) theta step raised on an empty max()."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    gated = fxprune.prepare(OneBranch(), (x,), fxprune.PruneConfig("both", check_every=2, exclude=("stem",)))
    opt = torch.optim.SGD(gated.parameters(), lr=0.02, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    with torch.no_grad():
        theta_of(gated, LayerGate(0)).zero_()
    pruner.remove({}, {0})
    assert state_of(gated).layout.size == 0
    losses = readme_loop(gated, opt, pruner, x, y, 4)  # steps and checks with nothing left to gate
    assert np.isfinite(losses).all() and pruner.steps == 4
