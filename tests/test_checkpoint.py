"""Checkpoint and resume: a run interrupted mid-training, with structures already removed,
continues with exactly the losses of the uninterrupted run."""

import pytest
import torch
from train_loop import train_steps

import fxprune
from fxprune.checkpoint import load_checkpoint, save_checkpoint
from fxprune.digits.models import resnet

# Aggressive enough that units and blocks are removed within the first steps.
CONFIG = fxprune.PruneConfig("both", gamma=200.0, theta_lr=2.0, warmup=0, check_every=2, patience=1, w_tol=1e3)
OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


def build(opt_name):
    torch.manual_seed(0)
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), torch.randn(4, 1, 8, 8), CONFIG)
    opt = OPTIMIZERS[opt_name](list(gated.parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return gated, opt, fxprune.Pruner(gated, opt), sched


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def steps(gated, opt, pruner, sched, data):
    gated.train()
    return train_steps(gated, opt, pruner, data, sched)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_resume_follows_the_uninterrupted_trajectory(tmp_path, opt_name):
    data = batches(12)
    whole = steps(*build(opt_name), data)

    gated, opt, pruner, sched = build(opt_name)
    first = steps(gated, opt, pruner, sched, data[:6])
    assert pruner.removals, "the config must remove structures before the checkpoint"
    shapes = {k: v.shape for k, v in gated.state_dict().items()}
    save_checkpoint(tmp_path / "run.ckpt", gated, opt, pruner, sched, step=6)
    torch.randn(100)  # the generator moves on, as it would in another process

    gated2, opt2, pruner2, sched2 = build(opt_name)
    assert load_checkpoint(tmp_path / "run.ckpt", gated2, opt2, pruner2, sched2) == {"step": 6}
    assert {k: v.shape for k, v in gated2.state_dict().items()} == shapes
    assert pruner2.removals == pruner.removals and pruner2.steps == 6
    rest = steps(gated2, opt2, pruner2, sched2, data[6:])
    assert first + rest == pytest.approx(whole, rel=1e-6, abs=1e-7)


def test_loading_into_a_used_pruner_or_a_wrong_file_is_a_clear_error(tmp_path):
    gated, opt, pruner, sched = build("adam")
    steps(gated, opt, pruner, sched, batches(2))
    save_checkpoint(tmp_path / "run.ckpt", gated, opt, pruner, sched)
    with pytest.raises(RuntimeError, match="fresh pruner"):
        load_checkpoint(tmp_path / "run.ckpt", gated, opt, pruner, sched)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an fxprune checkpoint"):
        load_checkpoint(tmp_path / "other.pt", *build("adam"))


def test_unwritable_checkpoint_path_is_a_clear_error(tmp_path):
    gated, opt, pruner, sched = build("adam")
    (tmp_path / "a-file").write_text("")  # a file where the folder should be
    with pytest.raises(OSError, match="cannot write the checkpoint"):
        save_checkpoint(tmp_path / "a-file" / "run.ckpt", gated, opt, pruner, sched)
