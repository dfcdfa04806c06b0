"""A gated model's state_dict describes itself: the live removals travel in it, so a plain
``torch.save(gated.state_dict())``, a safetensors file (what the HF Trainer writes) or any
framework's checkpoint loads into a freshly prepared model, and training resumes on the
uninterrupted run's losses whether the Pruner is built before the model is loaded or
after (Lightning restores the model before it builds the optimizer)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoint import CONFIG, OPTIMIZERS, batches, build, steps

import fxprune
from fxprune.digits.models import resnet
from fxprune.resume import PRUNER_KEY
from fxprune.state import state_of


def trained(opt_name="sgd-momentum", n=6):
    gated, opt, pruner, sched = build(opt_name)
    losses = steps(gated, opt, pruner, sched, batches(12)[:n])
    assert pruner.removals, "the config must remove structures in the first steps"
    return gated, opt, pruner, sched, losses


def fresh_model():
    torch.manual_seed(0)
    return fxprune.prepare(resnet(blocks=2, widths=(8, 12)), torch.randn(4, 1, 8, 8), CONFIG)


@pytest.mark.parametrize("how", ["torch.save", "safetensors"])
def test_a_saved_state_dict_loads_into_a_fresh_model_with_its_removals(tmp_path, how):
    gated, *_ = trained()
    sd = gated.state_dict()
    if how == "torch.save":
        torch.save(sd, tmp_path / "sd.pt")
        loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    else:
        save_file(sd, tmp_path / "model.safetensors")
        loaded = load_file(tmp_path / "model.safetensors")
    fresh = fresh_model()
    fresh.load_state_dict(loaded)  # strict: every key matched
    assert [r.keep for r in state_of(fresh).removals] == [r.keep for r in state_of(gated).removals]
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in sd.items() if k != PRUNER_KEY}
    x = torch.randn(8, 1, 8, 8)
    gated.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), gated(x))
    fresh.load_state_dict(loaded)  # loading again replays nothing more
    # the Pruner's state came with it: the Pruner built on the model next takes it up
    pruner = fxprune.Pruner(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9))
    assert pruner.steps == 6 and pruner.removals == state_of(fresh).removals


@pytest.mark.parametrize("order", ["pruner-first", "model-first", "model-only"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_resume_from_plain_state_dicts_follows_the_uninterrupted_run(order, opt_name):
    data = batches(12)
    whole = steps(*build(opt_name), data)
    gated, opt, pruner, sched = build(opt_name)
    first = steps(gated, opt, pruner, sched, data[:6])
    saved = {k: v for k, v in (("model", gated.state_dict()), ("opt", opt.state_dict()), ("pruner", pruner.state_dict()),
                               ("sched", sched.state_dict()))}
    rng = torch.get_rng_state()
    if order == "pruner-first":  # the objects built as at the start, then every state dict loaded
        gated2, opt2, pruner2, sched2 = build(opt_name)
        gated2.load_state_dict(saved["model"])  # replays the removals through the Pruner: its optimizer follows
    else:  # the model restored first, the optimizer and the Pruner built on it afterwards (model-only: the
        # Pruner's state is the one the model's state dict carried)
        gated2 = fresh_model()
        gated2.load_state_dict(saved["model"])
        opt2 = OPTIMIZERS[opt_name](list(gated2.parameters()))
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
        pruner2 = fxprune.Pruner(gated2, opt2)
    opt2.load_state_dict(saved["opt"])
    if order != "model-only":
        pruner2.load_state_dict(saved["pruner"])
    sched2.load_state_dict(saved["sched"])
    torch.set_rng_state(rng)
    assert pruner2.removals == pruner.removals and pruner2.steps == 6
    rest = steps(gated2, opt2, pruner2, sched2, data[6:])
    assert first + rest == pytest.approx(whole, rel=1e-6, abs=1e-7)


def test_a_state_dict_of_other_removals_is_refused_by_name():
    gated, *_ = trained()
    other, opt, pruner, sched, _ = trained("adam", n=8)
    assert [r.keep for r in pruner.removals] != [r.keep for r in state_of(gated).removals]
    with pytest.raises(ValueError, match="do not begin with the"):
        other.load_state_dict(gated.state_dict())
