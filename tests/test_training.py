"""The digits training loop, the magnitude-pruning baseline and the bench's tables."""

import importlib.util

import pytest
import torch

from fxprune import PruneConfig, prepare
from fxprune.benchmarks.digits import compare, robustness
from fxprune.cost import forward_flops
from fxprune.digits import models
from fxprune.digits.recipes import EXPERIMENTS, ROBUSTNESS
from fxprune.digits.training import fit, gate_count, make_optimizer, make_schedule, theta_undecided
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


@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None, reason="the bench extra (Torch-Pruning) is not installed")
def test_magnitude_prune_reaches_the_flops_target():
    from fxprune.benchmarks.baseline import magnitude_prune

    model, x = models.resnet(), torch.randn(1, 1, 8, 8)
    dense = forward_flops(model, (x,))
    small = magnitude_prune(model, x, 0.5 * dense)
    assert 0.4 * dense <= forward_flops(small, (x,)) <= 0.5 * dense
    assert small(x).shape == (1, 10)


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
