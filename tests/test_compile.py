"""torch.compile: the gated model trains compiled with no graph break per gate; the
compact model compiles with mode="max-autotune" and computes the same outputs."""

import torch
from train_loop import train_steps

import fxprune
from fxprune.digits.models import resnet
from fxprune.testing import random_masks


def test_gated_model_trains_under_compile_without_graph_breaks():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (x,), fxprune.PruneConfig("both", gamma=5.0, warmup=0))
    gated.train()
    explained = torch._dynamo.explain(gated)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1

    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(gated, opt)
    compiled = torch.compile(gated)
    losses = train_steps(compiled, opt, pruner, [(x, y)] * 4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # the thetas were learnt through the compiled graph
    thetas = pruner.theta.detach()
    assert (thetas < 1).any()


def test_compact_model_compiles_with_max_autotune():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    gated = random_masks(fxprune.prepare(resnet(blocks=1, widths=(8, 12)).eval(), (x,)), keep=0.5).eval()
    compact = fxprune.convert(gated).eval()
    compiled = torch.compile(compact, mode="max-autotune")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), compact(x), rtol=1e-4, atol=1e-5)
