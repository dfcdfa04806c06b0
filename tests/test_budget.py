"""Budgets, the default configuration, removal on the theta condition and the decision of
the gates: the model lands at its budget whatever the optimizer, and every step that
changes the model's structure leaves the function eval mode computes unchanged."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_loop import train_steps

import fxprune
from fxprune.config import DEFAULT_TARGET_FLOPS
from fxprune.cost import forward_flops
from fxprune.digits import models
from fxprune.digits.training import fit
from fxprune.state import UnitGate, gate_bank, state_of, theta_of


def mlp():
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3))


# ---------------------------------------------------------------- what PruneConfig() means
def test_default_config_is_a_flops_budget_and_gamma_alone_is_fixed_strength():
    assert fxprune.PruneConfig().targets == {"flops": DEFAULT_TARGET_FLOPS}
    assert fxprune.PruneConfig(gamma=3.0).targets == {}
    assert fxprune.PruneConfig(target_params=0.2).targets == {"params": 0.2}
    assert fxprune.PruneConfig(target_flops=0.3, target_params=0.2).targets == {"flops": 0.3, "params": 0.2}
    # the schedule is a fraction of total_steps when given, in steps when not
    c = fxprune.PruneConfig(total_steps=1000)
    assert (c.warmup_steps(), c.schedule_steps(), c.decide_step()) == (100, 250, 600)  # the budget at 0.35 of the run
    c = fxprune.PruneConfig()
    assert c.warmup_steps() < c.warmup_steps() + c.schedule_steps() < c.decide_step()
    with pytest.raises(ValueError, match="PruneConfig.decide=0.5 is a fraction of total_steps"):
        fxprune.PruneConfig(decide=0.5).decide_step()


@pytest.mark.parametrize("field, value, error, match", [
    ("budget_steps", -1, ValueError, "PruneConfig.budget_steps must be >= 0"),
    ("budget_steps", 1.5, ValueError, r"PruneConfig.budget_steps as a float is a fraction of total_steps, in \[0, 1\]"),
    ("decide", True, TypeError, "PruneConfig.decide must be steps"),
    ("decide", "end", TypeError, "PruneConfig.decide must be steps"),
    ("sharpen", -0.1, ValueError, "PruneConfig.sharpen must be >= 0"),
    ("sharpen", float("nan"), ValueError, "PruneConfig.sharpen must be finite"),
    ("target_flops", 0.0, ValueError, r"PruneConfig.target_flops must be in \(0, 1\]"),
    ("budget_lr", 0, ValueError, r"PruneConfig.budget_lr must be in \(0, 1\]"),
    ("budget_lr", 1.5, ValueError, r"PruneConfig.budget_lr must be in \(0, 1\]"),
])
def test_new_fields_are_checked(field, value, error, match):
    with pytest.raises(error, match=match):
        fxprune.PruneConfig(**{field: value})


# ---------------------------------------------------------------- budgets are met
@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw"])
@pytest.mark.parametrize("budget", [{"target_flops": 0.25}, {"target_params": 0.4},
                                    {"target_flops": 0.3, "target_params": 0.5}])
def test_trained_model_lands_at_its_budget_with_every_optimizer(budget, optimizer):
    torch.manual_seed(0)
    lr = {"adam": 1e-3, "sgd": 0.05, "adamw": 1e-3}[optimizer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AdamW's own weight decay is reported; it is part of the set-up
        run = fit(models.lenet_300_100(), 12, fxprune.PruneConfig(**budget), lr=lr, optimizer=optimizer)
    got = {"target_flops": run.flops / run.dense_flops, "target_params": run.params / run.dense_params}
    ratios = {field: got[field] / target for field, target in budget.items()}
    assert all(r <= 1.1 for r in ratios.values()), ratios  # every budget is met, within 10 %
    assert max(ratios.values()) >= 0.9, ratios  # and the one that binds is not undershot by more
    assert run.undecided == 0.0, "the decision leaves no gate between 0 and 1"
    assert run.accuracy > 90.0
    assert run.train_flops_ratio < 0.9, "structures are removed while training, not at the end"


def test_pruner_reports_multiplier_and_expected_cost():
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", target_flops=0.3, warmup=0, budget_steps=0))
    opt = torch.optim.SGD(gated.parameters(), lr=0.05)
    pruner = fxprune.Pruner(gated, opt)
    gated.train()
    first = pruner.report()
    train_steps(gated, opt, pruner, [(x, y)] * 20)
    last = pruner.report()
    assert set(last) == {"step", "flops", "params", "multiplier_flops"}
    assert first["multiplier_flops"] == 0.0 < last["multiplier_flops"], "above its budget, the cost pulls"
    assert last["flops"] < first["flops"] == pytest.approx(1.0)


def test_budget_schedule_falls_from_one_to_the_target_after_the_warmup():
    x = torch.randn(8, 6)
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", target_flops=0.2, warmup=10, budget_steps=40))
    pruner = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.01))
    seen = []
    for step in (0, 10, 20, 30, 50, 90):
        pruner.steps = step
        seen.append(pruner.targets()["flops"])
    assert seen[0] == seen[1] == 1.0 and seen[-2] == seen[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(seen[1:-1], seen[2:-1]))


# ---------------------------------------------------------------- removal on theta alone
def test_theta_condition_removes_large_weights_and_keeps_the_function():
    """A gate at 0 for ``patience`` checks is removed whatever its weights (``w_tol=None``,
    the default): the model eval mode computes is the same before and after."""
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0, check_every=1, patience=2))
    assert fxprune.PruneConfig().w_tol is None
    opt = torch.optim.Adam(gated.parameters(), lr=1e-3)
    pruner = fxprune.Pruner(gated, opt)
    theta = gate_bank(gated).theta
    with torch.no_grad():
        theta[[0, 3, 5, 40]] = 0.0  # switched off; their weights stay as large as any
    gated.eval()
    before = gated(x)
    flops = forward_flops(gated, (x,))
    removed = [pruner.check() for _ in range(2)]
    assert removed[0] is None and removed[1] is not None, "removed at the second check, not the first"
    assert sum(removed[1].units.values()) == 4
    torch.testing.assert_close(gated(x), before, rtol=1e-5, atol=1e-6)
    assert forward_flops(gated, (x,)) < flops
    compact = fxprune.convert(gated)
    torch.testing.assert_close(compact(x), before, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the decision
def test_decision_rounds_thetas_removes_and_fixes_them_keeping_the_function():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    # a fixed strength: rounding at 0.5 is the decision (under a budget too, when it lands
    # near the budget: test_decision_lands_at_the_budget...)
    config = fxprune.PruneConfig("units", gamma=3.0, warmup=0, decide=30, check_every=1000)
    gated = fxprune.prepare(mlp(), (x,), config)
    opt = torch.optim.SGD(gated.parameters(), lr=0.05)
    pruner = fxprune.Pruner(gated, opt)

    def train_step():
        gated.train()
        loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    for _ in range(29):
        train_step()
        pruner.step()
    assert not pruner.decided
    theta = pruner.theta.detach()
    assert ((theta > 0) & (theta < 1)).any(), "the budget has moved some gates between 0 and 1"
    train_step()
    gated.eval()
    with torch.no_grad():
        before = gated(x)
    removal = pruner.step()
    assert pruner.decided and removal is not None
    theta = pruner.theta.detach()
    assert ((theta == 0) | (theta == 1)).all() and (theta == 1).all(), "what is off was removed at once"
    with torch.no_grad():
        torch.testing.assert_close(gated(x), before, rtol=1e-5, atol=1e-6)
    for _ in range(3):  # after the decision the gates stay fixed and the masks are not sampled
        train_step()
        pruner.step()
    assert (pruner.theta.detach() == 1).all()


def test_decision_lands_at_the_budget_when_rounding_at_one_half_would_miss_it():
    """Rounding every theta at 0.5 can miss the budget by far (a ResNet's blocks, each a few
    per cent of the FLOPs, all just under 0.5 at the decision). The decision keeps the
    structures of highest theta so that the model it fixes is the closest to the budget."""
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    config = fxprune.PruneConfig("units", target_flops=0.5, warmup=0, budget_steps=1, decide=2, check_every=1000)
    gated = fxprune.prepare(nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 6)), (x,), config)
    pruner = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.0))
    dense_weight = dict(gated.named_parameters())["0.weight"].detach().clone()
    theta = pruner.theta.detach()
    ranks = torch.randperm(theta.numel(), generator=torch.Generator().manual_seed(1)).to(theta)
    theta.copy_(0.2 + 0.25 * ranks / theta.numel())  # every gate under 0.5: rounding would keep one unit
    pruner.step()
    pruner.step()
    assert pruner.decided
    compact = fxprune.convert(gated)
    weight = dict(compact.named_parameters())["0.weight"]
    assert abs(weight.shape[0] - 32) <= 1, f"{weight.shape[0]} of 64 units kept for a FLOPs budget of one half"
    top = ranks.argsort(descending=True)[: weight.shape[0]].sort().values
    torch.testing.assert_close(weight, dense_weight[top], msg="the units kept are those of highest theta")


class TwoHeads(nn.Module):
    """64 cheap hidden units and 2 costly ones (each feeds a 3,000-wide output): a cut of
    the ranking that meets on a costly unit jumps by a third of a FLOPs budget of 0.5."""

    def __init__(self):
        super().__init__()
        self.a, self.head_a = nn.Linear(200, 64), nn.Linear(64, 6)
        self.b, self.head_b = nn.Linear(200, 2), nn.Linear(2, 3000)

    def forward(self, x):
        return self.head_a(F.relu(self.a(x))), self.head_b(F.relu(self.b(x)))


def test_decision_skips_a_structure_too_costly_for_what_is_left_of_the_budget():
    """The decision's cut of the ranking can fall on a structure that weighs a third of the
    budget: the cut above it misses the budget by a sixth, the one below by more. The
    structures ranked after it that still fit are kept instead (a greedy fill)."""
    x = torch.randn(8, 200)
    config = fxprune.PruneConfig("units", target_flops=0.5, warmup=0, budget_steps=1, decide=2, check_every=1000)
    gated = fxprune.prepare(TwoHeads(), (x,), config)
    pruner = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.0))
    units = state_of(gated).layout.units
    cheap, costly = (next(g for g, sl in units.items() if sl.stop - sl.start == n) for n in (64, 2))
    with torch.no_grad():  # every theta under 0.5; the ranking: costly unit 0, the cheap ones, costly unit 1 among them
        theta_of(gated, UnitGate(cheap)).copy_(torch.linspace(0.45, 0.05, 64))
        theta_of(gated, UnitGate(costly)).copy_(torch.tensor([0.49, 0.3]))
    pruner.step()
    pruner.step()
    assert pruner.decided
    compact = fxprune.convert(gated)
    fraction = forward_flops(compact, (x[:1],)) / forward_flops(TwoHeads(), (x[:1],))
    assert fraction == pytest.approx(0.5, rel=0.05), f"FLOPs fraction {fraction:.3f} for a budget of 0.5"
    assert compact.b.out_features == 1, "the costly unit that does not fit is skipped"


def test_decision_keeps_what_eval_mode_keeps_when_that_lands_near_the_budget():
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    config = fxprune.PruneConfig("units", target_flops=0.5, warmup=0, budget_steps=1, decide=2, check_every=1000)
    gated = fxprune.prepare(nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 6)), (x,), config)
    pruner = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.0))
    theta = pruner.theta.detach()
    theta.copy_(torch.linspace(0.05, 0.95, theta.numel())[torch.randperm(theta.numel())])  # half of them >= 0.5
    gated.eval()
    with torch.no_grad():
        before = gated(x)
    pruner.step()
    pruner.step()
    assert pruner.decided and pruner.theta.numel() == 32
    with torch.no_grad():
        torch.testing.assert_close(gated(x), before, rtol=1e-5, atol=1e-6)


def test_decision_breaks_ties_among_switched_off_gates_by_their_weights():
    """A sharp dual step can switch off most gates a few steps before the decision (theta 0,
    not yet removed): the decision keeps those of largest weights to meet the budget."""
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    config = fxprune.PruneConfig("units", target_flops=0.5, warmup=0, budget_steps=1, decide=2, check_every=1000)
    gated = fxprune.prepare(nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 6)), (x,), config)
    pruner = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.0))
    with torch.no_grad():
        scale = torch.rand(64, 1) + 0.1
        params = dict(gated.named_parameters())
        params["0.weight"].copy_(torch.randn(64, 6).sign() * scale)  # every weight of unit i is +-scale_i
        params["0.bias"].copy_(scale.flatten())
        params["2.weight"].copy_(torch.randn(6, 64).sign() * scale.T)
    dense_weight = dict(gated.named_parameters())["0.weight"].detach().clone()
    pruner.theta.detach().zero_()
    pruner.step()
    pruner.step()
    weight = dict(fxprune.convert(gated).named_parameters())["0.weight"]
    assert abs(weight.shape[0] - 32) <= 1
    top = scale.flatten().argsort(descending=True)[: weight.shape[0]].sort().values
    torch.testing.assert_close(weight, dense_weight[top])
