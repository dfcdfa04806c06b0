"""How the budget controller presses the gates (PruneConfig.pressure).

With ``"cost"`` each gate was pressed by its cost gradient, so the units that feed many
layers (a residual stream's channels: on a 4-layer Llama each costs 16 times an MLP unit)
were pressed hardest, and a first-order data gradient, which sees one channel of a
redundant stream at a time, could not hold them: the stream went first (128 -> 58 at
half the FLOPs, +20 % bits per byte; resnet18's stem stream to 3 of 64 channels). The
default, ``"uniform"``, presses every gate that saves cost alike and lets the expected
cost's schedule set how hard."""

import glob
import os
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.budget import BudgetController
from fxprune.state import gate_bank, state_of


def _mlp():
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("pressure", ["uniform", "cost"])
def test_the_controller_presses_every_gate_alike_or_by_its_cost(pressure):
    x = torch.randn(4, 6)
    config = fxprune.PruneConfig("units", target_flops=0.5, warmup=0, budget_steps=0, pressure=pressure)
    gated = fxprune.prepare(_mlp(), (x,), config)
    pruner = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.1))
    controller = BudgetController(pruner.config, pruner.objective)
    theta = gate_bank(gated).theta.detach().clone().fill_(0.9)
    step = controller.corrected(theta, torch.zeros_like(theta), 0.1, 0)
    units = state_of(gated).layout.units
    per_group = [step[s] for s in units.values()]
    assert len(per_group) == 2
    assert all(bool((g > 0).all()) for g in per_group), "every gate is pressed down"
    assert float(pruner.objective.fractions_at(theta - step)["flops"]) == pytest.approx(0.5, abs=0.02)
    ratio = float(per_group[0].mean() / per_group[1].mean())
    if pressure == "uniform":
        assert torch.allclose(step, step[0].expand_as(step)), "alike"
    else:  # a unit of the 32-wide layer costs 6 + 8 MACs, one of the 8-wide 32 + 3
        assert ratio == pytest.approx(14 / 35, rel=0.05)


def test_pressure_is_checked():
    with pytest.raises(ValueError, match=r"PruneConfig.pressure must be one of \('uniform', 'cost'\)"):
        fxprune.PruneConfig(pressure="flops")
    assert fxprune.PruneConfig().pressure == "uniform"


class ByteLM(nn.Module):
    """Two pre-norm MLP blocks on a residual stream of 32 channels: a bigram model of bytes."""

    def __init__(self, width=32, hidden=96):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(width), "up": nn.Linear(width, hidden), "down": nn.Linear(hidden, width)})
            for _ in range(2))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](F.gelu(b["up"](b["norm"](h))))
        return self.head(self.norm(h))


def _text():
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:8]
    return torch.tensor(list(b"".join(open(f, "rb").read() for f in files)), dtype=torch.long)


def _train(pressure, steps=240):
    torch.manual_seed(0)
    data = _text()
    g = torch.Generator().manual_seed(0)
    batch = lambda: data[torch.randint(0, len(data) - 17, (32, 1), generator=g) + torch.arange(17)]
    first = batch()
    gated = fxprune.prepare(ByteLM(), (first[:, :16],), fxprune.PruneConfig("units", total_steps=steps, pressure=pressure))
    opt = torch.optim.AdamW(gated.parameters(), lr=3e-3, weight_decay=0.0)
    pruner = fxprune.Pruner(gated, opt)
    for _ in range(steps):
        w = batch()
        loss = F.cross_entropy(gated(w[:, :16]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        (loss + pruner.penalty()).backward()
        opt.step()
        pruner.step()
    compact = fxprune.convert(gated.eval())
    with torch.no_grad():
        g.manual_seed(1)
        held = [batch() for _ in range(8)]
        val = sum(float(F.cross_entropy(compact(w[:, :16]).flatten(0, 1), w[:, 1:].flatten())) for w in held) / 8
    return val, compact.embed.weight.shape[1], pruner.forward_flops() / pruner.dense_flops


def test_uniform_pressure_keeps_the_residual_stream_and_learns_better():
    """The stream's channels are pressed as hard as the MLP's units, not harder by what they feed."""
    uniform, cost = _train("uniform"), _train("cost")
    assert uniform[2] == pytest.approx(0.5, rel=0.05) and cost[2] == pytest.approx(0.5, rel=0.05)
    assert cost[1] < uniform[1], f"cost pressure cuts the stream first ({cost[1]} vs {uniform[1]} of 32)"
    assert uniform[0] < cost[0], f"held-out loss {uniform[0]:.3f} (uniform) vs {cost[0]:.3f} (cost)"
