"""Two gloo processes on 127.0.0.1 train through live removals with
fxprune.DistributedDataParallel: the thetas, the removals, the parameters after each
re-wrap and the compact models are the same on both ranks; thetas that differ are
refused on both, and so is a removal under a plain DDP wrapper."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from ddp_worker import train

import fxprune


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(train, args=(2, free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=150)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:  # never leave a hung process behind
        p.kill()
    assert not alive, "a process did not finish within 150 s"
    assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_thetas_are_equal_on_both_ranks_after_every_step(ranks):
    a, b = ranks
    assert len(a["thetas"]) == len(b["thetas"]) == 12
    for ta, tb in zip(a["thetas"], b["thetas"]):
        assert torch.equal(ta, tb)
    assert (a["thetas"][-1] < 1).any()  # they learnt


def test_removals_are_the_same_and_ddp_is_rebuilt_after_each(ranks):
    a, b = ranks
    assert a["removals"] and a["removals"] == b["removals"]
    assert all(units or layers for _, units, layers in a["removals"])  # no empty removal
    followed = sum(step < 12 for step, _, _ in a["removals"])  # the wrapper rebuilds at the next forward
    assert a["rewraps"] == b["rewraps"] == 1 + followed


def test_gradients_are_still_averaged_after_the_rewraps(ranks):
    a, b = ranks
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=1e-6)


def test_the_compact_models_are_the_same(ranks):
    a, b = ranks
    assert a["compact"].keys() == b["compact"].keys()
    for k in a["compact"]:
        torch.testing.assert_close(a["compact"][k], b["compact"][k], rtol=0, atol=1e-6)


def test_thetas_that_differ_between_ranks_are_refused_on_both(ranks):
    for r in ranks:
        assert r["mismatch"] and "thetas differ between processes" in r["mismatch"]


def test_a_config_that_differs_between_ranks_is_refused_on_both_naming_the_fields(ranks):
    """gamma was averaged silently; check_every hung until the process-group timeout."""
    for r in ranks:
        assert r["config"] and "PruneConfig differs between processes in gamma, check_every" in r["config"]


def test_a_removal_under_a_plain_ddp_wrapper_is_refused_on_both(ranks):
    for r in ranks:
        assert r["plain"] and "needs the gated model wrapped in fxprune.DistributedDataParallel" in r["plain"]


def test_the_wrapper_is_a_plain_call_without_a_process_group():
    x = torch.randn(4, 1, 8, 8)
    gated = fxprune.prepare(fxprune.digits.models.resnet(blocks=1, widths=(8,)), (x,))
    wrapper = fxprune.DistributedDataParallel(gated)
    with torch.no_grad():
        torch.testing.assert_close(wrapper.eval()(x), gated.eval()(x))
    assert wrapper.rewraps == 0 and wrapper.module is gated
