"""The torch.export front end: a model symbolic tracing refuses is prepared from its ATen
graph, and the rest of the pipeline (analysis, gates, training with live removal, convert,
export of the compact model) works the same on it."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netgen import networks
from test_equivalence import rel_err
from torch import nn
from train_loop import train_steps

import fxprune
from fxprune.testing import implied_param_count, random_masks


class ShapeBranch(nn.Module):
    """A forward that branches on the input's size (as timm's CrossViT and SAM do): symbolic
    tracing cannot evaluate ``x.shape[-1] != 8``, torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 4))

    def forward(self, x):
        if x.shape[-1] != 8:
            x = F.interpolate(x, size=(8, 8), mode="bilinear")
        x = self.conv(x)
        x = F.relu(x + self.block(x))
        return self.head(self.norm(x.mean((2, 3))))


def test_a_model_symbolic_tracing_refuses_is_prepared_through_torch_export():
    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(4, 3, 8, 8)
    with pytest.raises(fxprune.TraceError, match="ShapeBranch"):
        fxprune.prepare(model, (x,), front_end="symbolic")
    gated = fxprune.prepare(model, (x,))
    front, why = fxprune.front_end_of(gated)
    assert front == "export" and "cannot trace module 'ShapeBranch'" in why
    assert not any("aten" in str(n.target) for n in gated.graph.nodes if n.op == "call_function"), \
        "every ATen op of this model is read by a rule"
    cg = fxprune.channel_graph(gated)
    prunable, channels = cg.prunable_share()
    assert prunable == channels - 4, "all but the output are prunable, the residual stream and LayerNorm included"
    gated.eval()
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
    random_masks(gated, keep=0.5, seed=1)
    compact = fxprune.convert(gated).eval()
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)
    for batch in (x, torch.randn(7, 3, 8, 8)):  # the batch size stayed symbolic
        with torch.no_grad():
            assert rel_err(compact(batch), gated(batch)) <= 1e-5
    with torch.no_grad():
        ep = torch.export.export(compact, (x,))
        assert rel_err(ep.module()(x), gated(x)) <= 1e-5


def test_batch_norm_found_again_as_its_module_follows_train_and_eval():
    torch.manual_seed(0)
    model, x = ShapeBranch(), torch.randn(4, 3, 8, 8)
    gated = fxprune.prepare(model, (x,))
    bns = [n for n in gated.graph.nodes if n.op == "call_module" and isinstance(gated.get_submodule(n.target), nn.BatchNorm2d)]
    assert len(bns) == 3
    bn = gated.get_submodule(bns[0].target)
    before = bn.running_mean.clone()
    gated.train()
    gated(x)
    assert not torch.equal(bn.running_mean, before), "training updates the running statistics"
    gated.eval()
    with torch.no_grad():
        assert torch.equal(gated(x), gated(x)), "eval mode uses them, and dropout is off"


def test_training_an_exported_model_through_live_removals_and_converting():
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    config = fxprune.PruneConfig(target_flops=0.4, warmup=0, budget_steps=20, decide=60, check_every=5, theta_lr=0.5)
    gated = fxprune.prepare(ShapeBranch(), (x[:4],), config)
    assert fxprune.front_end_of(gated)[0] == "export"
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(gated, opt)
    gated.train()
    train_steps(gated, opt, pruner, [(x, y)] * 70)
    assert pruner.decided and any(now < before for _, before, now in pruner.widths()), "something was removed while training"
    gated.eval()
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        assert rel_err(compact(x), gated(x)) <= 1e-5
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in ShapeBranch().parameters())


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def test_a_model_neither_front_end_reads_gets_both_reasons():
    with pytest.raises(fxprune.TraceError) as err:
        fxprune.prepare(ValueBranch(), (torch.randn(2, 4),))
    msg = str(err.value)
    assert "cannot trace module 'ValueBranch'" in msg and "torch.export cannot export 'ValueBranch'" in msg


class Cumulative(nn.Module):
    """``torch.cumsum`` over the channels: no rule reads it; its ATen op stays in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[0] > 0:  # symbolic tracing refuses this
            x = self.a(x)
        return self.c(torch.cumsum(self.b(F.relu(x)), dim=-1))


def test_an_aten_op_without_a_rule_runs_and_freezes_its_channels_naming_it():
    gated = fxprune.prepare(Cumulative(), (torch.randn(2, 4),))
    reasons = fxprune.channel_graph(gated).frozen_reasons()
    assert any("aten::cumsum" in r or "cumsum" in r for r in reasons), reasons
    cg = fxprune.channel_graph(gated)
    assert cg.prunable_share()[0] == 8, "a's units stay prunable, b's are frozen by cumsum"
    random_masks(gated, keep=0.5, seed=0).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert rel_err(fxprune.convert(gated).eval()(x), gated(x)) <= 1e-5


def test_front_end_is_checked():
    with pytest.raises(ValueError, match="front_end must be one of"):
        fxprune.prepare(nn.Linear(2, 2), (torch.randn(2, 2),), front_end="dynamo")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=networks(), keep=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 1000))
def test_convert_equals_gated_model_through_torch_export(net, keep, seed):
    """The hypothesis grammar's networks, traced by torch.export instead of symbolic tracing."""
    model, x = net
    with torch.no_grad():
        dense = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = fxprune.prepare(model, (x,), front_end="export").eval()
    assert fxprune.front_end_of(gated)[0] == "export"
    with torch.no_grad():
        assert rel_err(gated(x), dense) <= 1e-6
    random_masks(gated, keep=keep, seed=seed)
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        assert rel_err(compact(x), gated(x)) <= 1e-4
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)
