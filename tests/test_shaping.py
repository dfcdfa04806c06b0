"""PruneConfig(multiple_of=k) and PruneConfig(uniform=True): widths a deployment can use,
met at the budget's tolerance, through live removal and the decision."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.cut import TOLERANCE
from fxprune.shaping import role_classes
from fxprune.state import gate_bank, state_of


class Block(nn.Module):
    def __init__(self, width=64, hidden=96):
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(F.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.stem = nn.Linear(6, 64)
        self.layers = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _train(config, steps=120, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    gated = fxprune.prepare(Stack(), (x[:2],), config)
    opt = torch.optim.Adam(gated.parameters(), lr=3e-3)
    pruner = fxprune.Pruner(gated, opt)
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(gated(x[idx]), y[idx]) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        for sl in state_of(gated).layout.units.values():  # through every live removal
            n = sl.stop - sl.start
            if config.multiple_of:
                assert n % config.multiple_of == 0 or n in (64, 96), n
    return gated, pruner


def _hidden_widths(compact):
    return [m.out_features for name, m in compact.named_modules() if name.endswith(".up")]


def test_the_layers_of_a_module_list_play_one_role_per_group():
    gated = fxprune.prepare(Stack(), (torch.randn(2, 6),), fxprune.PruneConfig("units"))
    cg, layout = fxprune.channel_graph(gated), state_of(gated).layout
    classes = role_classes(cg, list(layout.units))
    assert [len(c) for c in classes] == [3]  # the three hidden widths; the residual stream is one group
    assert gate_bank(gated).roles == classes


def test_multiple_of_keeps_every_width_a_multiple_and_meets_the_budget():
    gated, pruner = _train(fxprune.PruneConfig(total_steps=120, target_flops=0.5, multiple_of=8))
    compact = fxprune.convert(gated.eval())
    widths = [m.out_features for m in compact.modules() if isinstance(m, nn.Linear)][:-1]
    assert all(w % 8 == 0 or w in (64, 96) for w in widths), widths
    assert pruner.budget_miss <= TOLERANCE
    assert pruner.report()["flops"] == pytest.approx(0.5, rel=TOLERANCE)


def test_a_budget_the_multiples_cannot_reach_is_missed_and_said_so():
    """Training prunes this stack's residual stream only (pressed by its cost, the costliest
    units), whose FLOPs move by 1/8 per 8 channels: 0.4 lies between 0.375 and 0.5, and the
    decision does not cut the widths training kept to reach it."""
    with pytest.warns(UserWarning, match="misses the budget"):
        gated, pruner = _train(fxprune.PruneConfig(total_steps=120, target_flops=0.4, multiple_of=8, pressure="cost"))
    assert TOLERANCE < pruner.budget_miss <= 0.125 / 0.4 / 2 + 1e-9  # within half a step of the multiples


def test_uniform_keeps_every_layer_alike_and_meets_the_budget():
    # the residual stream kept whole (it would take the whole budget): the blocks' widths are what is pruned
    units = dict(total_steps=120, target_flops=0.4, structures="units", exclude=("stem",))
    gated, pruner = _train(fxprune.PruneConfig(uniform=True, **units))
    compact = fxprune.convert(gated.eval())
    widths = _hidden_widths(compact)
    assert len(set(widths)) == 1 and widths[0] < 96, widths
    assert pruner.budget_miss <= TOLERANCE
    plain, _ = _train(fxprune.PruneConfig(**units))
    assert len(set(_hidden_widths(fxprune.convert(plain.eval())))) > 1  # what uniform changes


def test_live_removal_rounds_up_and_keeps_the_extra_units_gated():
    x = torch.randn(4, 6)
    gated = fxprune.prepare(Stack(), (x,), fxprune.PruneConfig("units", check_every=10**6, multiple_of=8, uniform=True))
    pruner = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.1))
    layout = state_of(gated).layout
    hidden = gate_bank(gated).roles[0]
    theta = gate_bank(gated).theta
    with torch.no_grad():
        for k, g in enumerate(hidden):  # layer k switches off 10 + 5 k of its 96 units
            theta[layout.units[g].start:layout.units[g].start + 10 + 5 * k] = 0.0
    gated.eval()
    with torch.no_grad():
        before = gated(x)
    pruner.remove({g: (gate_bank(gated).theta[layout.units[g]] == 0).numpy() for g in hidden}, set())
    widths = [state_of(gated).layout.units[g].stop - state_of(gated).layout.units[g].start for g in hidden]
    assert widths == [88, 88, 88]  # the widest keeps 86, rounded up to 88; every layer alike
    with torch.no_grad():
        torch.testing.assert_close(gated(x), before)  # the extra units are still gated off


def test_the_options_are_checked():
    with pytest.raises(ValueError, match="multiple_of"):
        fxprune.PruneConfig(multiple_of=0)
    with pytest.raises(TypeError, match="uniform"):
        fxprune.PruneConfig(uniform=1)


def test_the_expected_cost_counts_the_widths_multiple_of_keeps():
    """The controller brought the expected cost to the budget while the decision kept
    every width rounded to a multiple (the Llama example: 0.56 of the FLOPs for a budget
    of 0.5): the cost now prices a group at its rounded width, with the gradient of its
    expected count."""
    x = torch.randn(4, 6)
    net = lambda: nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))  # noqa: E731
    plain = fxprune.Pruner(g := fxprune.prepare(net(), (x,), fxprune.PruneConfig("units", min_share=0.0)),
                           torch.optim.SGD(g.parameters(), lr=0.1)).objective
    shaped = fxprune.Pruner(h := fxprune.prepare(net(), (x,), fxprune.PruneConfig("units", min_share=0.0, multiple_of=8)),
                            torch.optim.SGD(h.parameters(), lr=0.1)).objective
    (hidden,) = state_of(g).layout.units.values()
    for expected_units, rounded in [(17, 24), (16, 16), (3.5, 8), (33, 40)]:
        theta = torch.zeros(40)
        theta[: int(expected_units)] = 1.0
        theta[int(expected_units)] = expected_units % 1
        whole = torch.zeros(40)
        whole[:rounded] = 1.0
        assert float(shaped.fractions_at(theta)["flops"]) == pytest.approx(float(plain.fractions_at(whole)["flops"]))
    theta = torch.full((40,), 0.45, requires_grad=True)  # 18 expected units, priced as 24
    shaped.fractions_at(theta)["flops"].backward()
    grad = theta.grad.clone()
    theta.grad = None
    plain.fractions_at(theta)["flops"].backward()
    assert torch.all(grad > theta.grad)  # the same direction, scaled by the rounding: 24 / 18
    torch.testing.assert_close(grad / theta.grad, torch.full((40,), 24 / 18, dtype=grad.dtype))
