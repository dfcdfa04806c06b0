"""The learning method's machinery: theta updates, estimator, live removal, optimizer surgery."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from train_loop import MLP, train_steps

import fxprune
from fxprune.state import LayerGate, UnitGate, gate_bank, state_of, theta_of


def switch_off(gated, gid, units):
    """Push some units to theta = 0."""
    with torch.no_grad():
        theta_of(gated, UnitGate(gid))[units] = 0.0


def group_of_size(gated, n):
    return next(g for g, sl in state_of(gated).layout.units.items() if sl.stop - sl.start == n)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
])
def test_live_removal_slices_params_and_optimizer_state(make_opt):
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig(structures="units", gamma=0.0))
    opt = make_opt(list(gated.parameters()))
    pruner = fxprune.Pruner(gated, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    train_steps(gated, opt, pruner, [(x, y)] * 3)
    sched.step()
    w = gated.get_submodule("layers.0").weight
    before = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v) and v.shape == w.shape}
    gid = group_of_size(gated, 12)
    switch_off(gated, gid, [1, 4, 7])
    gated.eval()
    with torch.no_grad():
        ref = gated(x)
    drop = np.zeros(12, dtype=bool)
    drop[[1, 4, 7]] = True
    pruner.remove({gid: drop}, set())
    with torch.no_grad():
        torch.testing.assert_close(gated(x), ref, rtol=1e-5, atol=1e-6)  # the function is unchanged
    assert gated.get_submodule("layers.0").weight is w and w.shape == (9, 6)
    assert gated.get_submodule("layers.1").weight.shape == (10, 9)
    kept = np.flatnonzero(~drop)
    assert before, "the optimizer had per-element state to slice"
    for k, v in before.items():
        torch.testing.assert_close(opt.state[w][k], v[kept])  # kept entries unchanged, removed ones gone
    gated.train()
    train_steps(gated, opt, pruner, [(x, y)] * 3)  # optimizer and scheduler keep working
    sched.step()
    assert theta_of(gated, UnitGate(gid)).numel() == 9


def test_removal_makes_steps_cheaper_and_convert_still_equivalent():
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    gated = fxprune.prepare(MLP((6, 32, 32, 3)), (x,), fxprune.PruneConfig(structures="units"))
    opt = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    dense = pruner.forward_flops()
    gid = next(iter(state_of(gated).layout.units))
    drop = np.zeros(32, dtype=bool)
    drop[:20] = True
    switch_off(gated, gid, list(range(20)))
    pruner.remove({gid: drop}, set())
    assert pruner.forward_flops() < dense
    train_steps(gated, opt, pruner, [(x, y)] * 2)
    assert pruner.live_flops < dense
    compact = fxprune.convert(gated.eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-5, atol=1e-6)


def test_layer_removal_during_training():
    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=4)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    gated = fxprune.prepare(model, (x,), fxprune.PruneConfig(structures="layers"))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    train_steps(gated, opt, pruner, [(x, y)] * 1)
    with torch.no_grad():
        theta_of(gated, LayerGate(1)).zero_()
    gated.eval()
    with torch.no_grad():
        ref = gated(x)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    pruner.remove({}, {1})
    with torch.no_grad():
        torch.testing.assert_close(gated(x), ref, rtol=1e-5, atol=1e-5)
    assert 1 not in state_of(gated).layout.layers and 1 not in fxprune.channel_graph(gated).branches
    assert "layer1.1.conv1" not in dict(gated.named_modules())
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params - 6  # conv, bn, conv, bn
    gated.train()
    train_steps(gated, opt, pruner, [(x, y)] * 2)


def test_theta_stays_in_unit_interval():
    torch.manual_seed(3)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig(theta_lr=50.0, gamma=5.0, check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01)
    pruner = fxprune.Pruner(gated, opt)
    train_steps(gated, opt, pruner, [(x, y)] * 20)
    assert 0.0 <= pruner.theta.min().item() and pruner.theta.max().item() <= 1.0
    assert pruner.theta.min().item() == 0.0  # the projection was active


def test_diverged_theta_gradient_is_a_clear_error_at_the_next_check():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig(check_every=3))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01)
    pruner = fxprune.Pruner(gated, opt)
    for step in range(2):
        (F.cross_entropy(gated(x), y) + pruner.penalty()).backward()
        if step == 1:
            pruner.theta.grad[0] = float("nan")
        pruner.step()  # no host synchronisation here: the error waits for the check
    assert torch.isfinite(pruner.theta).all()  # the non-finite entry did not move theta
    (F.cross_entropy(gated(x), y) + pruner.penalty()).backward()
    with pytest.raises(FloatingPointError, match="not finite at step 1.*lower the weight learning rate"):
        pruner.step()


class LinearReadout(nn.Module):
    """The loss is linear in each hidden unit's mask, so the straight-through gradient is exact."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_estimator_matches_exact_difference():
    torch.manual_seed(4)
    x = torch.randn(64, 3)
    gated = fxprune.prepare(LinearReadout(), (x,), fxprune.PruneConfig(structures="units", gamma=0.0, lam1=0.0,
                                                                     estimator="straight_through"))
    theta = gate_bank(gated).theta.requires_grad_(True)
    gated.train()
    gated(x).mean().backward()
    ste = theta.grad.clone()
    exact = torch.zeros(5)
    gated.eval()
    with torch.no_grad():
        for g in range(5):
            on = gated(x).mean()
            theta[g] = 0.0
            exact[g] = on - gated(x).mean()
            theta[g] = 1.0
    torch.testing.assert_close(ste, exact, rtol=1e-4, atol=1e-6)


def test_balanced_estimator_matches_exact_difference_of_a_quadratic_loss():
    """With a squared loss the per-example loss is quadratic in each mask, where the
    trapezoid rule is exact: the balanced estimator's mean over the gates' sampling is
    E[loss | xi_g = 1] - E[loss | xi_g = 0], at any theta. The straight-through one's is not."""
    torch.manual_seed(6)
    x0, y0 = torch.randn(8, 3), torch.randn(8, 1)
    x, y = x0.repeat(4000, 1), y0.repeat(4000, 1)
    theta = torch.tensor([0.3, 0.5, 0.8, 0.6, 0.4])
    grads = {}
    for estimator in ("balanced", "straight_through"):
        torch.manual_seed(7)
        gated = fxprune.prepare(LinearReadout(), (x0,), fxprune.PruneConfig(structures="units", estimator=estimator))
        gate = gate_bank(gated).theta
        with torch.no_grad():
            gate.copy_(theta)
        gate.requires_grad_(True)
        gated.train()
        F.mse_loss(gated(x), y).backward()
        grads[estimator] = gate.grad.clone()
    exact = torch.zeros(5)
    with torch.no_grad():  # theta at 0/1 fixes the masks (eval mode would keep one unit when all are off)
        for mask in itertools.product([0, 1], repeat=5):
            m = torch.tensor(mask, dtype=torch.float32)
            gate.copy_(m)
            loss = F.mse_loss(gated(x0), y0)
            prob = torch.where(m > 0, theta, 1 - theta)
            for g in range(5):  # d/dtheta_g of E[loss] = sum over masks of loss * d prob / d theta_g
                exact[g] += loss * prob.prod() / prob[g] * (1 if mask[g] else -1)
    torch.testing.assert_close(grads["balanced"], exact, rtol=0.05, atol=2e-3)
    st_error = (grads["straight_through"] - exact).abs()
    assert (st_error > 0.5 * exact.abs()).any()  # its mean depends on theta itself


def test_estimator_sign_on_a_nonlinear_loss():
    torch.manual_seed(5)
    x, y = torch.randn(128, 6), torch.randint(0, 3, (128,))
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig(structures="units"))
    theta = gate_bank(gated).theta.requires_grad_(True)
    gated.train()
    F.cross_entropy(gated(x), y).backward()
    gated.eval()
    agree = total = 0
    for u in range(theta.numel()):
        with torch.no_grad():
            on = F.cross_entropy(gated(x), y)
            theta[u] = 0.0
            diff = (on - F.cross_entropy(gated(x), y)).item()
            theta[u] = 1.0
        if abs(diff) > 1e-3:
            total += 1
            agree += np.sign(diff) == np.sign(theta.grad[u].item())
    assert total >= 5 and agree / total >= 0.9


def test_model_without_prunable_structure_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    gated = fxprune.prepare(model, (x,))
    with pytest.raises(ValueError, match="no prunable structure"):
        fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.1))


def test_switched_off_units_with_large_weights_get_their_moments_reset():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    config = fxprune.PruneConfig(structures="units", gamma=0.0, patience=1, w_tol=1e-6)
    gated = fxprune.prepare(MLP(), (x,), config)
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(gated, opt)
    train_steps(gated, opt, pruner, [(x, y)] * 3)
    w = gated.get_submodule("layers.0").weight
    gid = group_of_size(gated, 12)
    before = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v) and v.shape == w.shape}
    switch_off(gated, gid, [2, 5])
    assert pruner.check() is None  # weights far from zero: nothing is removed
    for k, v in opt.state[w].items():
        if k in before:
            assert v[[2, 5]].abs().sum() == 0
            torch.testing.assert_close(v[[0, 1, 3]], before[k][[0, 1, 3]])
    assert w.shape[0] == 12


def test_moments_are_reset_once_when_a_structure_is_switched_off_not_at_every_check():
    """The reset clears the momentum a structure built while it was active. After it, the
    momentum the spike prior's pull builds is what shrinks the weights towards the weight
    condition; zeroing it again at every check held removal back (the digits ResNet under
    SGD with ``w_tol=0.1`` trained at 0.34 of dense FLOPs with checks every 20 steps, 0.25
    with checks every 50)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    config = fxprune.PruneConfig(structures="units", gamma=0.0, theta_lr=0.0, patience=2, check_every=5, w_tol=1e-6)
    gated = fxprune.prepare(MLP(), (x,), config)
    opt = torch.optim.SGD(gated.parameters(), lr=1e-2, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    train_steps(gated, opt, pruner, [(x, y)] * 5)
    w = gated.get_submodule("layers.0").weight
    gid = group_of_size(gated, 12)
    switch_off(gated, gid, [2, 5])
    zeroed = []
    for _ in range(4):  # checks at steps 10 (off once), 15 (ripe: reset), 20, 25
        train_steps(gated, opt, pruner, [(x, y)] * 5)
        zeroed.append(bool(opt.state[w]["momentum_buffer"][[2, 5]].abs().sum() == 0))
    assert w.shape[0] == 12  # weights far from zero: nothing removed
    assert zeroed == [False, True, False, False]


def test_warmup_ramps_the_cost_strength_from_zero():
    x = torch.randn(16, 6)
    config = fxprune.PruneConfig(structures="units", gamma=8.0, warmup=10)
    gated = fxprune.prepare(MLP(), (x,), config)
    pruner = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.01))
    without_cost = pruner.objective.penalty(gamma=0.0)
    torch.testing.assert_close(pruner.penalty(), without_cost)
    seen = []
    for _ in range(12):
        seen.append(pruner.gamma())
        pruner.step()
    assert seen[:3] == [0.0, 0.8, 1.6] and seen[5] == pytest.approx(4.0) and seen[10:] == [8.0, 8.0]
    assert pruner.penalty() > without_cost


@pytest.mark.parametrize("bad, match", [
    (dict(estimator="reinforce"), "estimator must be"),
    (dict(warmup=-1), "warmup must be >= 0"),
])
def test_config_rejects_bad_estimator_and_warmup(bad, match):
    with pytest.raises(ValueError, match=match):
        fxprune.PruneConfig(**bad)


def _prior_by_structure(objective, theta, lam1, lam0):
    """method.md's weight prior written plainly: ``1/2 lam1 ||W||^2`` over every weight,
    plus ``1/2 (lam0 - lam1) (1 - theta_s) ||W_s||^2`` for every unit (its rows in each of
    its producers and carriers) and every gated branch (all its weights)."""
    total = 0.5 * lam1 * sum((w * w).sum() for w in objective.weights)
    for w, dim, slots in objective.unit_channels():
        rows = (w * w).sum([d for d in range(w.dim()) if d != dim]) if w.dim() > 1 else w * w
        total = total + 0.5 * (lam0 - lam1) * ((1 - theta[torch.as_tensor(slots)]) * rows).sum()
    for b, slot in state_of(objective.gated).layout.layers.items():
        total = total + 0.5 * (lam0 - lam1) * (1 - theta[slot]) * sum((w * w).sum() for w in objective.branch_weights(b))
    return total


@pytest.mark.parametrize("which", ["resnet", "transformer"])
def test_weight_prior_and_its_gradients_match_the_prior_written_per_structure(which):
    """The penalty's index-tensor form (one squared sum per weight, ``index_add`` into the
    theta layout) gives the same value and the same gradients, for the weights and the
    thetas, as the prior written structure by structure: units, residual branches, and a
    head x head_dim product group whose rows count for both factors."""
    from test_attention import PackedAttention, Transformer

    from fxprune.digits.models import resnet

    torch.manual_seed(0)
    model, x = (resnet(0.5), torch.randn(4, 1, 8, 8)) if which == "resnet" else (Transformer(PackedAttention), torch.randn(4, 7, 5))
    gated = fxprune.prepare(model, (x,), fxprune.PruneConfig(gamma=0.0, sharpen=0.0))
    bank = gate_bank(gated)
    with torch.no_grad():
        bank.theta.uniform_(0.05, 0.95)
    objective = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.1)).objective  # theta learns
    assert state_of(gated).layout.layers if which == "resnet" else objective._more_rows
    c = objective.config
    indexed, plain = objective.penalty(gamma=0.0), _prior_by_structure(objective, bank.theta, c.lam1, c.lam0)
    torch.testing.assert_close(indexed, plain)
    inputs = [*objective.weights, bank.theta]
    for got, want in zip(torch.autograd.grad(indexed, inputs), torch.autograd.grad(plain, inputs)):
        torch.testing.assert_close(got, want)
