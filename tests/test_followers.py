"""Copies of the gated model follow its live removals: an EMA of the weights (torch's
AveragedModel, timm's ModelEmaV3) built at the start of training used to fail at its first
update after a removal (a size mismatch); through ``pruner.follow(ema)`` it is rebuilt
with the live structure and its own averaged values, sliced as the removal record says,
keeps averaging, and converts to a compact model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_removal_record import switch_off
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import fxprune
from fxprune.digits.models import resnet
from fxprune.passes.compact import max_relative_error
from fxprune.resume import PRUNER_KEY
from fxprune.state import state_of


def timm_ema(gated):
    from timm.utils import ModelEmaV3

    return ModelEmaV3(gated, decay=0.9)


EMAS = {
    "AveragedModel": (lambda g: AveragedModel(g, multi_avg_fn=get_ema_multi_avg_fn(0.9)), lambda e, g: e.update_parameters(g)),
    "timm.ModelEmaV3": (timm_ema, lambda e, g: e.update(g)),
}


def setup():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (x,), fxprune.PruneConfig(check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
    return gated, opt, fxprune.Pruner(gated, opt), x, y


def train(gated, opt, pruner, x, y, ema, update, steps):
    for _ in range(steps):
        loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        update(ema, gated)


@pytest.mark.parametrize("kind", list(EMAS))
def test_an_ema_copy_that_is_not_followed_breaks_at_the_first_removal(kind):
    make, update = EMAS[kind]
    gated, opt, pruner, x, y = setup()
    ema = make(gated)
    train(gated, opt, pruner, x, y, ema, update, 2)
    pruner.remove(*switch_off(gated))
    with pytest.raises(RuntimeError, match="size|shape"):
        update(ema, gated)


@pytest.mark.parametrize("kind", list(EMAS))
def test_a_followed_ema_keeps_its_own_averages_through_removals_and_converts(kind):
    make, update = EMAS[kind]
    gated, opt, pruner, x, y = setup()
    ema = pruner.follow(make(gated))
    train(gated, opt, pruner, x, y, ema, update, 3)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    live = {k: v.clone() for k, v in gated.state_dict().items()}
    record = pruner.remove(*switch_off(gated))
    after = ema.module.state_dict()
    assert ema.module is not gated
    live_now = {k: v.shape for k, v in gated.state_dict().items() if k != PRUNER_KEY}  # the copy has no Pruner
    assert {k: v.shape for k, v in after.items()} == live_now
    for name, cuts in record.slices.items():  # the average's own values, sliced: not the live weights
        want = before[name]
        for dim, kept in cuts:
            want = want.index_select(dim, torch.as_tensor(kept))
        torch.testing.assert_close(after[name], want, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(before[n], live[n]) for n in record.slices if before[n].is_floating_point())
    assert state_of(ema.module).version == state_of(gated).version == 1
    train(gated, opt, pruner, x, y, ema, update, 3)  # averaging goes on
    pruner.remove(*switch_off(gated, units=2, layer=1))
    train(gated, opt, pruner, x, y, ema, update, 2)
    copy = ema.module.eval()
    with torch.no_grad():
        out = copy(x)
        compact = fxprune.convert(copy)
        assert max_relative_error(compact(x), out) < 1e-4
    assert np.isfinite(out.numpy()).all()


def test_a_failing_follower_after_the_ema_puts_the_ema_back():
    make, update = EMAS["AveragedModel"]
    gated, opt, pruner, x, y = setup()
    ema = pruner.follow(make(gated))
    train(gated, opt, pruner, x, y, ema, update, 2)
    held = ema.module

    @pruner.on_removal
    def fails(record):
        raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected failure"):
        pruner.remove(*switch_off(gated))
    assert ema.module is held and state_of(gated).version == 0
    update(ema, gated)  # still the model's shapes


def test_following_a_copy_from_before_a_removal_or_not_a_copy_is_refused():
    gated, opt, pruner, x, y = setup()
    stale = AveragedModel(gated)
    pruner.remove(*switch_off(gated))
    with pytest.raises(ValueError, match="from before 1 of its live removals"):
        pruner.follow(stale)
    with pytest.raises(TypeError, match="'module' attribute"):
        pruner.follow(torch.nn.Linear(2, 2))
