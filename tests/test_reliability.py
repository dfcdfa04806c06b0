"""Reliability (issue: no silently wrong training): parameters the gated model does not
own stay in the optimizer, a skipped non-finite batch does not poison the pruner, and a
second Pruner on one gated model is refused."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.state import gate_bank


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def _switch_off_and_remove(gated, pruner, units=(0, 3)):
    with torch.no_grad():
        gate_bank(gated).theta[list(units)] = 0.0
    removal = None
    for _ in range(pruner.config.patience):
        removal = pruner.check()
    assert removal is not None
    return removal


@pytest.mark.parametrize("how", ["one list", "add_param_group"])
def test_parameters_outside_the_gated_model_stay_in_the_optimizer_through_a_removal(how):
    """A separate head (or loss module) trained by the same optimizer: the first removal
    filtered every group down to the gated model's parameters, and the head stopped
    learning while it still got gradients."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0))
    head = nn.Linear(3, 2)
    if how == "one list":
        opt = torch.optim.SGD([*gated.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.SGD(gated.parameters(), lr=0.1, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    if how == "add_param_group":
        opt.add_param_group({"params": head.parameters(), "lr": 0.1})
    _switch_off_and_remove(gated, pruner)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in head.parameters()} <= held, "the head is still trained"
    before = head.weight.detach().clone()
    loss = F.cross_entropy(head(gated(x)), y) + pruner.penalty()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(head.weight, before)


def test_a_skipped_non_finite_batch_does_not_poison_the_pruner():
    """The user skips a batch whose loss is not finite (zero_grad, no step): theta is a
    buffer, so neither zero_grad cleared its NaN gradient, and the first non-finite step
    was remembered for ever: every later check raised and nothing was removed again."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0, check_every=2))
    opt = torch.optim.SGD(gated.parameters(), lr=0.05)
    pruner = fxprune.Pruner(gated, opt)
    bad = x.clone()
    bad[0, 0] = float("nan")
    loss = F.cross_entropy(gated(bad), y) + pruner.penalty()
    loss.backward()
    assert not torch.isfinite(loss)
    opt.zero_grad()  # the user's skip: no optimizer step, no pruner step
    pruner.penalty()
    assert pruner.theta.grad is None, "once the model's gradients are cleared, so is theta's"
    for _ in range(4):  # then training goes on, finite
        loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    assert torch.isfinite(pruner.theta).all()
    _switch_off_and_remove(gated, pruner)


def test_a_non_finite_step_reported_once_then_training_recovers():
    """A non-finite theta gradient that reaches pruner.step() is reported at the next check;
    once the steps are finite again, later checks remove as usual."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0, check_every=1000))
    opt = torch.optim.SGD(gated.parameters(), lr=0.05)
    pruner = fxprune.Pruner(gated, opt)
    (F.cross_entropy(gated(x), y) + pruner.penalty()).backward()
    pruner.theta.grad[0] = float("nan")
    pruner.step()
    with pytest.raises(FloatingPointError, match="step 0"):
        pruner.check()
    for _ in range(2):
        loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    _switch_off_and_remove(gated, pruner)


def test_a_second_pruner_on_one_gated_model_is_refused():
    x = torch.randn(4, 6)
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1)
    first = fxprune.Pruner(gated, opt)
    with pytest.raises(RuntimeError, match="already has a Pruner"):
        fxprune.Pruner(gated, opt)
    del first  # a Pruner that is gone holds nothing: a new one may take over
    fxprune.Pruner(gated, opt)
