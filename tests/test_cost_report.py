"""The per-layer cost report: it accounts for every FLOP and parameter, lines up dense
and pruned layers by name, and draws them."""

import torch

import fxprune
from fxprune.cost import forward_flops
from fxprune.digits.models import resnet
from fxprune.report.costs import cost_table, layer_costs, plot_costs
from fxprune.state import decisions
from fxprune.testing import random_masks


def test_layer_costs_add_up_to_the_model_and_follow_pruning(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    model = resnet().eval()
    dense = layer_costs(model, (x,))
    assert sum(f for f, _ in dense.values()) == forward_flops(model, (x[:1],))
    assert sum(p for _, p in dense.values()) == sum(p.numel() for p in model.parameters())

    gated = random_masks(fxprune.prepare(model, (x,)), keep=0.5, seed=2).eval()
    assert layer_costs(gated, (x,)).keys() == dense.keys()  # gate modules are not layers
    compact = fxprune.convert(gated)
    now = layer_costs(compact, (x,))
    assert sum(f for f, _ in now.values()) == forward_flops(compact, (x[:1],))
    assert all(now[k][0] <= dense[k][0] and now[k][1] <= dense[k][1] for k in now)
    dropped = decisions(gated)[1]
    assert dropped and len(now) < len(dense)  # removed branches have no layers left

    table = cost_table(dense, now)
    assert table.splitlines()[-1].startswith("| total") and "conv1" in table
    png = plot_costs(dense, now, tmp_path / "cost.png", "test")
    assert png.read_bytes().startswith(b"\x89PNG")
