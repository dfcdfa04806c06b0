"""Reliability (issue: no silently wrong training): parameters the gated model does not
own stay in the optimizer, a skipped non-finite batch does not poison the pruner, and a
second Pruner on one gated model is refused."""

import copy

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


# ---------------------------------------------------------------- decisions files are validated
def test_gradient_accumulation_over_many_micro_batches_is_not_warned_about():
    """32 micro-batches per optimizer step called penalty() 32 times per pruner.step():
    the warning 'penalty() was called 20 times without pruner.step()' was false."""
    import warnings
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01)
    pruner = fxprune.Pruner(gated, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.zero_grad()
            for _ in range(32):
                (F.cross_entropy(gated(x), y) + pruner.penalty()).div(32).backward()
            opt.step()
            pruner.step()


def test_an_optimizer_stepping_without_the_pruner_is_warned_about():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01)
    pruner = fxprune.Pruner(gated, opt)
    with pytest.warns(UserWarning, match=r"optimizer.step\(\) ran 20 times without pruner.step\(\)"):
        for _ in range(20):
            opt.zero_grad()
            (F.cross_entropy(gated(x), y) + pruner.penalty()).backward()
            opt.step()


def test_a_step_the_grad_scaler_skips_moves_no_theta_and_no_counter():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", target_flops=0.5, warmup=0, budget_steps=0))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    pruner = fxprune.Pruner(gated, opt, scaler=scaler)
    loss = F.cross_entropy(gated(x), y) + pruner.penalty()
    scaler.scale(loss * float("inf")).backward()  # an overflow: the scaler skips this step
    scaler.step(opt)
    scaler.update()
    theta = pruner.theta.detach().clone()
    pruner.step()
    assert pruner.steps == 0, "a skipped step is not a step of the schedule"
    assert torch.equal(pruner.theta.detach(), theta), "nor does the controller move the gates"


def test_an_example_in_another_floating_dtype_than_the_model_is_refused():
    with pytest.raises(TypeError, match=r"example input 'input' is torch.float64.*parameters are torch.float32"):
        fxprune.prepare(mlp(), (torch.randn(4, 6, dtype=torch.float64),))


# ---------------------------------------------------------------- buffer mutations
class Counting(nn.Module):
    """A forward that writes into its buffers: a call counter and a running mean."""

    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        self.calls.add_(1)
        h = torch.relu(self.l(x))
        self.ema.mul_(0.9).add_(0.1 * h.mean(0).detach())
        return self.o(h)


def test_buffer_writes_in_forward_are_kept_and_prepare_runs_leave_buffers_as_they_were():
    """Symbolic tracing ran calls.add_(1) and ema.mul_(0.9) once at trace time instead of
    recording them (calls left the state_dict, the running mean lost its decay), and the
    check compared outputs only; the export front end kept them, but prepare's own runs
    bumped the counter."""
    torch.manual_seed(0)
    model = Counting()
    x = torch.randn(3, 4)
    gated = fxprune.prepare(model, (x,), fxprune.PruneConfig("units", gamma=1.0))
    assert fxprune.front_end_of(gated)[0] == "export" and "buffer" in fxprune.front_end_of(gated)[1]
    buffers = dict(gated.named_buffers())
    assert float(buffers["calls"]) == 0.0 and not buffers["ema"].any(), "prepare's own runs change no buffer"
    reference = copy.deepcopy(model)
    gated.eval()
    for _ in range(3):
        with torch.no_grad():
            torch.testing.assert_close(gated(x), reference(x))
    buffers = dict(gated.named_buffers())
    assert float(buffers["calls"]) == 3.0
    torch.testing.assert_close(buffers["ema"], reference.ema)


def test_buffer_writes_refused_by_the_symbolic_front_end_name_the_buffer():
    with pytest.raises(fxprune.TraceError, match=r"writes into buffer 'calls'"):
        fxprune.prepare(Counting(), (torch.randn(3, 4),), fxprune.PruneConfig("units", gamma=1.0), front_end="symbolic")


def test_prepare_in_two_threads_at_once_works():
    """Two threads preparing through torch.export at once failed with a message saying the
    model cannot be exported (both front ends patch process-wide state while tracing)."""
    import threading

    from fxprune.digits.models import resnet
    results, errors = [], []

    def work(seed):
        try:
            torch.manual_seed(seed)
            results.append(fxprune.prepare(resnet(blocks=1, widths=(4,)), (torch.randn(2, 1, 8, 8),),
                                           fxprune.PruneConfig(gamma=1.0), front_end="export"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted on
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 2


def test_a_pruner_config_that_differs_from_the_prepared_one_in_a_prepare_time_field_is_refused():
    """Pruner(gated, opt, config=...) silently replaced the prepared config: the Pruner then
    reported estimator="straight_through" while the gates stayed balanced."""
    x = torch.randn(4, 6)
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"estimator='straight_through'.*prepared with 'balanced'"):
        fxprune.Pruner(gated, opt, fxprune.PruneConfig("units", gamma=1.0, estimator="straight_through"))
    with pytest.raises(ValueError, match=r"min_units=3.*prepared with 1"):
        fxprune.Pruner(gated, opt, fxprune.PruneConfig("units", gamma=1.0, min_units=3))
    pruner = fxprune.Pruner(gated, opt, fxprune.PruneConfig("units", gamma=2.0))  # a training-time field may differ
    assert pruner.config.gamma == 2.0


class BranchFirst(nn.Module):
    """A residual branch registered first: its weight is the model's first parameter."""

    def __init__(self):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
        self.hidden, self.out = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x + self.branch(x))))


def test_theta_gradients_accumulate_over_micro_batches_after_the_first_parameter_was_removed():
    """The parameter whose cleared gradient tells a user's zero_grad is picked again after a
    removal: one deleted with its branch has no gradient any more, and penalty() would drop
    theta's gradient between micro-batches."""
    from fxprune.state import LayerGate, theta_of
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    gated = fxprune.prepare(BranchFirst(), (x,), fxprune.PruneConfig("both", gamma=1.0))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01)
    pruner = fxprune.Pruner(gated, opt)
    (branch,) = fxprune.state_of(gated).layout.layers
    assert next(gated.parameters()) is dict(gated.named_parameters())["branch.0.weight"]
    with torch.no_grad():
        theta_of(gated, LayerGate(branch)).zero_()
    pruner.remove({}, {branch})
    assert "branch.0.weight" not in dict(gated.named_parameters())
    gated.train()
    grads = []
    for _ in range(2):
        (F.cross_entropy(gated(x), y) + pruner.penalty()).backward()
        grads.append(pruner.theta.grad.clone())
    assert not torch.equal(grads[0], grads[1]), "the second micro-batch's theta gradient adds to the first's"


class UnflattenToConv(nn.Module):
    """A Linear's width unflattened into channels and a 2x2 map, convolved and flattened."""

    def __init__(self):
        super().__init__()
        self.fc, self.u, self.conv, self.out = nn.Linear(5, 64), nn.Unflatten(1, (16, 2, 2)), nn.Conv2d(16, 3, 1), nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.flatten(self.conv(self.u(self.fc(x))), 1))


class InPlaceAfterResidual(nn.Module):
    """An unused in-place ReLU, an in-place residual add, and an in-place add whose
    mutation (not its result) reaches the output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        F.relu(y, inplace=True)
        z = self.b(y)
        z += y
        z.add_(1)
        return z


@pytest.mark.parametrize("make, shape", [(UnflattenToConv, (2, 5)), (InPlaceAfterResidual, (2, 3, 6, 6))],
                         ids=["unflatten-into-a-conv", "in-place-writes"])
def test_compaction_under_random_masks_computes_what_the_gated_model_computes(make, shape):
    """Both converted into models failing the compaction check: the unflatten's 2x2 map
    was taken for heads x head_dim and pruned though the conv reads it as its spatial
    dims; the dead-code pass dropped F.relu(y, inplace=True), and a dropped branch's
    z.add_(1) was made out of place with its result unread."""
    from fxprune.testing import random_masks
    torch.manual_seed(0)
    x = torch.randn(*shape)
    for seed in range(6):
        gated = fxprune.prepare(make(), (x,))
        random_masks(gated, seed=seed)
        compact = fxprune.convert(gated)
        torch.testing.assert_close(compact(x), gated.eval()(x), rtol=1e-5, atol=1e-5)


def test_channels_on_a_convs_spatial_dims_are_frozen_with_the_reason():
    gated = fxprune.prepare(UnflattenToConv(), (torch.randn(2, 5),))
    reasons = " ".join(fxprune.channel_graph(gated).frozen_reasons())
    assert "conv 'conv' reads them on its spatial dim" in reasons


def test_a_parameter_list_kept_for_clip_grad_norm_reads_no_removed_parameter():
    """A list of the gated model's parameters taken before a removal (the usual
    ``params = list(model.parameters())`` for ``clip_grad_norm_``) kept the deleted
    branch's last gradients, inflating the norm on every later step."""
    from fxprune.state import LayerGate, theta_of
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    gated = fxprune.prepare(BranchFirst(), (x,), fxprune.PruneConfig("both", gamma=1.0))
    params = list(gated.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    pruner = fxprune.Pruner(gated, opt)
    (branch,) = fxprune.state_of(gated).layout.layers
    gated.train()
    (F.cross_entropy(gated(x), y) + pruner.penalty()).backward()
    opt.step()
    pruner.step()
    with torch.no_grad():
        theta_of(gated, LayerGate(branch)).zero_()
    pruner.remove({}, {branch})
    for _ in range(3):
        opt.zero_grad()
        (F.cross_entropy(gated(x), y) + pruner.penalty()).backward()
        cached = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        live = torch.nn.utils.get_total_norm([p.grad for p in gated.parameters() if p.grad is not None])
        assert torch.equal(cached, live)
        opt.step()
        pruner.step()
