"""The digits training loop, the magnitude-pruning baseline and the bench's tables."""

import importlib.util

import pytest
import torch

from fxprune import PruneConfig, prepare
from fxprune.benchmarks.digits import compare, robustness
from fxprune.cost import forward_flops
from fxprune.digits import models
from fxprune.digits.recipes import EXPERIMENTS, ROBUSTNESS
from fxprune.digits.training import fit, gate_count, make_optimizer, make_schedule, reinitialised, theta_undecided
from fxprune.state import gate_bank


def test_fit_prunes_while_training_and_reports_the_compact_model():
    run = fit(models.lenet_300_100(), 8, PruneConfig("units", gamma=8.0, theta_lr=0.5, check_every=10), seed=0)
    assert run.params == sum(p.numel() for p in run.model.parameters()) < run.dense_params
    assert run.flops == forward_flops(run.model, (torch.zeros(1, 1, 8, 8),)) < run.dense_flops
    assert run.train_flops_ratio < 1.0 and run.history, "structures must go during training, not after"
    assert run.widths[-1] == 10 and run.accuracy > 50


def test_fit_dense_is_the_reference():
    run = fit(models.lenet_300_100(), 2, seed=0)
    assert run.params == run.dense_params and run.flops == run.dense_flops and run.accuracy > 80


def test_reinitialised_redraws_every_parameter_of_a_compact_model_and_keeps_its_architecture():
    run = fit(models.resnet(), 1, PruneConfig(target_flops=0.5, total_steps=20, warmup=0, budget_steps=10, decide=15), seed=0)
    with torch.no_grad():  # BatchNorm statistics that training moved
        assert any(b.abs().sum() > 0 for n, b in run.model.named_buffers() if n.endswith("running_mean"))
    fresh = reinitialised(run.model, seed=1)
    old, new = dict(run.model.named_parameters()), dict(fresh.named_parameters())
    assert old.keys() == new.keys() and all(old[k].shape == new[k].shape for k in old)
    assert all(not torch.equal(old[k], new[k]) for k in old if old[k].numel() > 1 and old[k].std() > 0), "every tensor is re-drawn"
    assert all(torch.equal(b, torch.zeros_like(b)) for n, b in fresh.named_buffers() if n.endswith("running_mean"))
    assert all(torch.equal(a, b) for a, b in zip(reinitialised(run.model, seed=1).parameters(), fresh.parameters())), "seeded"
    x = torch.randn(2, 1, 8, 8)
    assert fresh(x).shape == run.model(x).shape


def test_reinitialised_names_a_parameter_no_module_redraws():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.scale = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.fc(x) * self.scale

    with pytest.raises(ValueError, match="scale"):
        reinitialised(Scaled())


@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None, reason="the bench extra (Torch-Pruning) is not installed")
def test_magnitude_prune_reaches_the_flops_target():
    from fxprune.benchmarks.baseline import magnitude_prune

    model, x = models.resnet(), torch.randn(1, 1, 8, 8)
    dense = forward_flops(model, (x,))
    small = magnitude_prune(model, x, 0.5 * dense)
    assert forward_flops(small, (x,)) == pytest.approx(0.5 * dense, rel=0.05)
    assert small(x).shape == (1, 10)


@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None, reason="the bench extra (Torch-Pruning) is not installed")
def test_magnitude_prune_takes_the_ratio_closest_to_the_target_on_either_side():
    """At 1.6 % of the digits ResNet's FLOPs the uniform ratios step from 1.7 % (widths 2-4-9)
    to 0.8 % (1-3-7); the baseline gets the closer one, not half the FLOPs it is compared at."""
    from fxprune.benchmarks.baseline import magnitude_prune

    model, x = models.resnet(), torch.randn(1, 1, 8, 8)
    dense = forward_flops(model, (x,))
    small = magnitude_prune(model, x, 0.016 * dense)
    assert forward_flops(small, (x,)) == pytest.approx(0.016 * dense, rel=0.15)


@pytest.mark.parametrize("prior", sorted(ROBUSTNESS))
def test_robustness_table_has_a_row_per_width(prior):
    rows, summary = robustness((1, 2), 2, 2, ROBUSTNESS[prior])
    assert [r[0] for r in rows] == ["x1", "x2"] and set(summary) == {1, 2}
    assert all(len(v["acc"]) == 2 and len(v["cv"]) == 2 for v in summary.values())


def test_cosine_schedule_anneals_the_learning_rate_to_zero_and_bad_names_are_errors():
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], "sgd", 0.1)
    schedule = make_schedule(opt, "cosine", 10)
    lrs = []
    for _ in range(10):
        opt.step()
        schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == sorted(lrs, reverse=True) and lrs[4] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.0)
    assert make_schedule(opt, "constant", 10) is None
    with pytest.raises(ValueError, match="schedule must be 'constant' or 'cosine'"):
        make_schedule(opt, "linear", 10)


def test_undecided_fraction_counts_removed_gates_as_decided():
    gated = prepare(models.lenet_300_100(), (torch.zeros(2, 1, 8, 8),), PruneConfig("units"))
    with torch.no_grad():
        gate_bank(gated).theta[:4] = 0.5  # 4 of the 400 gates undecided
    assert theta_undecided(gated) == pytest.approx(4 / 400)
    assert theta_undecided(gated, total=800) == pytest.approx(4 / 800)
    assert gate_count(gated) == 400


@pytest.mark.parametrize("index", range(len(EXPERIMENTS)), ids=[e.name for e in EXPERIMENTS])
def test_bench_experiments_run_with_their_recipe(index):
    """Each benchmark entry (optimizer, schedule, estimator, warm-up) runs end to end for two
    epochs and reports the dense and pruned rows of its model."""
    exp = EXPERIMENTS[index]
    rows = compare(exp, 0, 2, baseline=False)
    label = f"fxprune ({exp.config.structures}, gamma={exp.config.gamma:g})"
    assert [r[:2] for r in rows] == [[exp.name, "dense"], [exp.name, label]]
    dense_params, pruned_params = (int(r[4].replace(",", "")) for r in rows)
    assert 0 < pruned_params <= dense_params
