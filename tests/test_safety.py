"""The safety net around the user's loop: config validation, the pruner's checks and
warnings, checkpoints that refuse what does not fit, export at any batch size, exclusions,
reports by layer name, and decisions re-applied to a fresh model."""

import logging
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_loop import train_steps

import fxprune
from fxprune.checkpoint import load_checkpoint, save_checkpoint
from fxprune.decisions import apply_decisions, save_decisions
from fxprune.digits.models import lenet_300_100, resnet
from fxprune.export import save_compact
from fxprune.report.tables import widths_table
from fxprune.state import decisions, gate_bank, state_of
from fxprune.testing import random_masks


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("field, value, error, match", [
    ("gamma", float("nan"), ValueError, "PruneConfig.gamma must be finite"),
    ("gamma", math.inf, ValueError, "PruneConfig.gamma must be finite"),
    ("gamma", True, TypeError, "PruneConfig.gamma must be a number, got True"),
    ("gamma", "10", TypeError, "PruneConfig.gamma must be a number, got '10'"),
    ("gamma", -5, ValueError, "PruneConfig.gamma must be >= 0"),
    ("check_every", 2.5, TypeError, "PruneConfig.check_every must be a whole number"),
    ("patience", 0, ValueError, "PruneConfig.patience must be >= 1"),
    ("beta", 1.5, ValueError, r"PruneConfig.beta must be in \[0, 1\]"),
    ("reset_moments", 1, TypeError, "PruneConfig.reset_moments must be True or False"),
    ("exclude", [3], TypeError, "PruneConfig.exclude must be module names"),
    ("min_units", 0, ValueError, "PruneConfig.min_units must be >= 1"),
])
def test_config_checks_every_field_at_construction_and_on_assignment(field, value, error, match):
    with pytest.raises(error, match=match):
        fxprune.PruneConfig(**{field: value})
    config = fxprune.PruneConfig()
    with pytest.raises(error, match=match):
        setattr(config, field, value)


def test_config_normalises_what_it_accepts():
    config = fxprune.PruneConfig(gamma=3, exclude="conv1", cost_reference=(1, 2, 3))
    assert config.gamma == 3.0 and isinstance(config.gamma, float) and config.exclude == ("conv1",)
    assert config.cost_reference == fxprune.CostReference(1.0, 2.0, 3.0)


# ---------------------------------------------------------------- the pruner's checks
def test_an_optimizer_over_other_tensors_is_refused_naming_them():
    x = torch.randn(4, 6)
    model = mlp()
    gated = fxprune.prepare(model, (x,))
    with pytest.raises(ValueError, match=r"does not hold 6 of the gated model's trainable parameters \(0.weight"):
        fxprune.Pruner(gated, torch.optim.SGD(model.parameters(), lr=0.1))  # over the original, not the copy


def test_weight_decay_on_gated_parameters_is_warned_about():
    gated = fxprune.prepare(mlp(), (torch.randn(4, 6),))
    with pytest.warns(UserWarning, match="weight_decay=0.01 .* applied twice"):
        fxprune.Pruner(gated, torch.optim.AdamW(gated.parameters(), lr=1e-3))


def test_a_loop_that_never_adds_the_penalty_or_never_steps_is_warned_about():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    gated = fxprune.prepare(mlp(), (x,))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01)
    pruner = fxprune.Pruner(gated, opt)
    with pytest.warns(UserWarning, match="penalty\\(\\) has not been added to the loss for 20 steps"):
        for _ in range(20):
            F.cross_entropy(gated(x), y).backward()
            opt.step()
            pruner.step()
    with pytest.warns(UserWarning, match="ran 20 times without pruner.step\\(\\)"):
        for _ in range(20):  # the optimizer steps, the pruner does not (penalty() per micro-batch is no sign of it)
            (F.cross_entropy(gated(x), y) + pruner.penalty()).backward()
            opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(gated, opt, pruner, [(x, y)] * 25)  # a correct loop: no warning (each is given once)


# ---------------------------------------------------------------- checkpoints
CONFIG = fxprune.PruneConfig("both", gamma=200.0, theta_lr=2.0, warmup=0, check_every=2, patience=1, w_tol=1e3)


def run(tmp_path, opt=torch.optim.SGD, steps=4, widths=(8, 12)):
    torch.manual_seed(0)
    gated = fxprune.prepare(resnet(blocks=2, widths=widths), torch.randn(4, 1, 8, 8), CONFIG)
    optimizer = opt(gated.parameters(), lr=0.05)
    pruner = fxprune.Pruner(gated, optimizer)
    gated.train()
    g = torch.Generator().manual_seed(1)
    train_steps(gated, optimizer, pruner,
                [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))] * steps)
    return gated, optimizer, pruner


class Payload:
    def __reduce__(self):
        return (print, ("a foreign checkpoint ran code",))


def test_checkpoints_refuse_what_does_not_fit_naming_the_file(tmp_path, capfd):
    gated, opt, pruner = run(tmp_path)
    assert pruner.removals
    path = save_checkpoint(tmp_path / "run.ckpt", gated, opt, pruner, epoch=1)
    assert load_checkpoint(path, *run(tmp_path, steps=0)) == {"epoch": 1}

    torch.save({"format": "fxprune-checkpoint-2", "payload": Payload()}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="foreign.ckpt' is not a readable fxprune checkpoint"):
        load_checkpoint(tmp_path / "foreign.ckpt", *run(tmp_path, steps=0))
    assert "ran code" not in capfd.readouterr().out  # loaded with weights_only: nothing executed

    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.ckpt' is not a readable fxprune checkpoint"):
        load_checkpoint(tmp_path / "cut.ckpt", *run(tmp_path, steps=0))
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt' is not a readable"):
        load_checkpoint(tmp_path / "junk.ckpt", *run(tmp_path, steps=0))

    with pytest.raises(ValueError, match="run.ckpt' was written for another model or config"):
        load_checkpoint(path, *run(tmp_path, steps=0, widths=(6, 12)))  # a narrower model
    fresh = run(tmp_path, opt=torch.optim.Adam, steps=0)
    with pytest.raises(ValueError, match="run.ckpt' was written with a SGD optimizer; this run has a Adam"):
        load_checkpoint(path, *fresh)
    assert not fresh[2].removals  # refused before anything was changed


# ---------------------------------------------------------------- export
def test_the_exported_model_takes_any_batch_size(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)  # a batch of one, as the demo saves it
    gated = random_masks(fxprune.prepare(resnet(blocks=1, widths=(8, 12)), (x,)), keep=0.5, seed=0).eval()
    compact = fxprune.convert(gated).eval()
    paths = save_compact(compact, (x,), tmp_path / "out")
    program = torch.export.load(paths["pt2"]).module()
    for batch in (1, 7, 64):
        xb = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(program(xb), compact(xb), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- exclusions and floors
def test_excluded_modules_keep_their_channels_and_branches():
    x = torch.randn(4, 1, 8, 8)
    model = resnet(blocks=1, widths=(8, 12))
    plain = fxprune.prepare(model, (x,))
    gated = fxprune.prepare(model, (x,), fxprune.PruneConfig(exclude=("0", "3.*")))
    cg = fxprune.channel_graph(gated)
    stem = next(cg.group_of(b.space) for b in cg.bindings if b.owner == "0")
    assert not stem.prunable and "module '0' is excluded" in stem.frozen[-1]
    assert len(state_of(gated).layout.layers) == len(state_of(plain).layout.layers) - 1  # block 3's branch
    assert len(state_of(gated).layout.units) < len(state_of(plain).layout.units)


def test_min_units_keeps_that_many_units_in_every_dimension():
    x = torch.randn(4, 6)
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", min_units=3))
    with torch.no_grad():
        gate_bank(gated).theta.zero_()
    assert [int(k.sum()) for k in decisions(gated)[0].values()] == [3, 3]
    compact = fxprune.convert(gated.eval())
    assert [m.out_features for m in compact.modules() if isinstance(m, nn.Linear)] == [3, 3, 3]


# ---------------------------------------------------------------- reports and decisions
def test_removals_are_reported_by_layer_name(caplog):
    x = torch.randn(16, 6)
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1)
    pruner = fxprune.Pruner(gated, opt)
    g = next(iter(state_of(gated).layout.units))
    with torch.no_grad():
        fxprune.state.theta_of(gated, fxprune.UnitGate(g))[:5] = 0.0
    with caplog.at_level(logging.INFO, logger="fxprune"):
        pruner.remove({g: np.arange(16) < 5}, set())
    assert "removed 5 units of 0" in caplog.text
    assert pruner.widths() == [("0", 16, 11), ("2", 12, 12), ("4", 3, 3)]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in widths_table(pruner.widths()).splitlines()[2:]]
    assert rows == [["0", "16", "11"], ["2", "12", "12"], ["4", "3", "3"]]


def test_decisions_learnt_on_one_run_apply_to_a_fresh_copy(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (x,), fxprune.PruneConfig("both", check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1)
    pruner = fxprune.Pruner(gated, opt)
    layout = state_of(gated).layout
    g0, g1 = list(layout.units)[:2]
    with torch.no_grad():
        fxprune.state.theta_of(gated, fxprune.UnitGate(g0))[:3] = 0.0
        fxprune.state.theta_of(gated, fxprune.LayerGate(1)).zero_()
    pruner.remove({g0: np.arange(layout.units[g0].stop - layout.units[g0].start) < 3}, {1})
    with torch.no_grad():
        fxprune.state.theta_of(gated, fxprune.UnitGate(g1))[1] = 0.2  # off, not removed yet
    path = save_decisions(tmp_path / "decisions.json", gated, pruner)
    assert path.stat().st_size < 4000
    compact = fxprune.convert(gated.eval())

    torch.manual_seed(5)  # other weights
    fresh = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (x,), fxprune.PruneConfig("both"))
    apply_decisions(fresh, path)
    other = fxprune.convert(fresh.eval())
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(other) == shapes(compact)
    with pytest.raises(ValueError, match="made for another model"):
        apply_decisions(fxprune.prepare(lenet_300_100(), (torch.randn(2, 1, 8, 8),)), path)


# ---------------------------------------------------------------- examples
def test_the_examples_report_the_users_model_as_it_was(tmp_path):
    done = subprocess.run([sys.executable, "examples/prune_while_training.py", "--epochs", "1"], capture_output=True,
                          text=True, timeout=600, cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "parameters 50,610 at the start" in done.stdout


def test_an_exclude_pattern_that_names_no_layer_is_refused():
    """A misspelt name excluded nothing, silently."""
    with pytest.raises(ValueError, match=r"PruneConfig.exclude: \['conv9'\] name no layer"):
        fxprune.prepare(resnet(blocks=1, widths=(4,)), (torch.randn(2, 1, 8, 8),), fxprune.PruneConfig(exclude=("conv9",)))

