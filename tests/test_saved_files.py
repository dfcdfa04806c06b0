"""Files fxprune reads back are checked before anything changes: a decisions file with an
unknown unit, count or flag; a checkpoint whose bytes changed, a write that fails half
way, an optimizer of another group layout; the grad scaler travels in the checkpoint."""


import pytest
import torch
import torch.nn.functional as F
from test_reliability import mlp

import fxprune
from fxprune.state import gate_bank


def _decisions_file(tmp_path):
    from fxprune.decisions import save_decisions
    x = torch.randn(4, 6)
    gated = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0))
    path = save_decisions(tmp_path / "d.json", gated)
    return path, x


@pytest.mark.parametrize("edit, match", [
    (lambda r, g: r["groups"][g].__setitem__("kept", [-1]), r"group \d+: 'kept' holds -1, not a unit index in \[0, 16\)"),
    (lambda r, g: r["groups"][g].__setitem__("kept", [1.7]), r"'kept' holds 1.7, not a unit index"),
    (lambda r, g: r["groups"][g].__setitem__("kept", [True] * 8), r"'kept' holds True, not a unit index"),
    (lambda r, g: r["groups"][g].__setitem__("kept", [16]), r"'kept' holds 16, not a unit index in \[0, 16\)"),
    (lambda r, g: r["groups"][g].__setitem__("kept", [2, 2]), r"'kept' lists unit 2 twice"),
    (lambda r, g: r["groups"][g].__setitem__("kept", "0,1"), r"'kept' must be a list of unit indices"),
    (lambda r, g: r["groups"][g].pop("kept"), r"group \d+ has no 'kept'"),
    (lambda r, g: r.pop("groups"), r"has no 'groups'"),
])
def test_a_decisions_file_is_checked_before_anything_changes(tmp_path, edit, match):
    """'kept': [-1] kept the last unit, [1.7] unit 1, [True] * 8 only unit 1, and bad
    entries gave raw IndexError / KeyError without the file named."""
    import json

    from fxprune.decisions import apply_decisions
    path, x = _decisions_file(tmp_path)
    record = json.loads(path.read_text())
    group = next(g for g, v in record["groups"].items() if v["units"] == 16)
    edit(record, group)
    path.write_text(json.dumps(record))
    fresh = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0))
    before = gate_bank(fresh).theta.clone()
    with pytest.raises(ValueError, match=match) as info:
        apply_decisions(fresh, path)
    assert str(path) in str(info.value), "the error names the file"
    assert torch.equal(gate_bank(fresh).theta, before), "nothing changed"


def test_an_empty_kept_list_keeps_no_unit_of_its_own_accord(tmp_path):
    """'kept': [] is a group with every unit dropped; what eval keeps (the best unit of an
    empty dimension) is the gates' floor, not unit 0 picked by an index of an empty array."""
    import json

    from fxprune.decisions import apply_decisions
    path, x = _decisions_file(tmp_path)
    record = json.loads(path.read_text())
    group = next(g for g, v in record["groups"].items() if v["units"] == 16)
    record["groups"][group]["kept"] = []
    path.write_text(json.dumps(record))
    fresh = fxprune.prepare(mlp(), (x,), fxprune.PruneConfig("units", gamma=1.0))
    apply_decisions(fresh, path)
    layout = fxprune.state_of(fresh).layout
    assert (gate_bank(fresh).theta[layout.units[int(group)]] == 0).all()


def test_a_branch_kept_must_be_true_or_false(tmp_path):
    import json

    from fxprune.decisions import apply_decisions, save_decisions
    from fxprune.digits.models import resnet
    x = torch.randn(4, 1, 8, 8)
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (x,), fxprune.PruneConfig("both", gamma=1.0))
    path = save_decisions(tmp_path / "d.json", gated)
    record = json.loads(path.read_text())
    branch = next(iter(record["branches"]))
    record["branches"][branch]["kept"] = "false"  # a string: was truthy, so the branch was kept
    path.write_text(json.dumps(record))
    fresh = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (x,), fxprune.PruneConfig("both", gamma=1.0))
    with pytest.raises(ValueError, match=rf"branch {branch}: 'kept' must be true or false, got 'false'"):
        apply_decisions(fresh, path)


# ---------------------------------------------------------------- checkpoints
def _ckpt_run(opt_cls=torch.optim.SGD, steps=3, scaler=None, **opt_kwargs):
    from fxprune.digits.models import resnet
    torch.manual_seed(0)
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (torch.randn(4, 1, 8, 8),),
                            fxprune.PruneConfig("both", gamma=200.0, warmup=0, check_every=2, patience=1))
    opt = opt_cls(gated.parameters(), lr=0.05, **opt_kwargs)
    pruner = fxprune.Pruner(gated, opt, scaler=scaler)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    return gated, opt, pruner


def test_a_checkpoint_whose_bytes_changed_is_refused_by_its_checksum(tmp_path):
    from fxprune.checkpoint import load_checkpoint, save_checkpoint
    gated, opt, pruner = _ckpt_run()
    path = save_checkpoint(tmp_path / "run.ckpt", gated, opt, pruner)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit, in the middle of the weights
    (tmp_path / "flipped.ckpt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped.ckpt'.*checksum"):
        load_checkpoint(tmp_path / "flipped.ckpt", *_ckpt_run(steps=0))
    assert load_checkpoint(path, *_ckpt_run(steps=0)) == {}


def test_a_failed_checkpoint_write_leaves_no_temporary_file_and_the_previous_checkpoint(tmp_path, monkeypatch):
    import os

    from fxprune.checkpoint import save_checkpoint
    gated, opt, pruner = _ckpt_run()
    path = save_checkpoint(tmp_path / "run.ckpt", gated, opt, pruner)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="cannot write the checkpoint"):
        save_checkpoint(path, gated, opt, pruner)
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"], "no run.ckpt.tmp left behind"
    assert path.read_bytes() == before


def test_an_optimizer_of_another_group_layout_is_refused_before_the_removals_are_replayed(tmp_path):
    """Refused only after the removals were replayed into the fresh model, and then
    require_fresh forbade the retry with the right optimizer."""
    from fxprune.checkpoint import load_checkpoint, save_checkpoint
    gated, opt, pruner = _ckpt_run()
    assert pruner.removals
    path = save_checkpoint(tmp_path / "run.ckpt", gated, opt, pruner)
    fresh, fresh_opt, fresh_pruner = _ckpt_run(steps=0)
    params = list(fresh.parameters())
    two_groups = torch.optim.SGD([{"params": params[:3]}, {"params": params[3:]}], lr=0.05)
    other = fxprune.Pruner.__new__(fxprune.Pruner)  # the same pruner, seen through another optimizer
    other.__dict__.update(fresh_pruner.__dict__, optimizer=two_groups)
    with pytest.raises(ValueError, match=r"run.ckpt'.*1 parameter group.*this optimizer has 2"):
        load_checkpoint(path, fresh, two_groups, other)
    assert not fresh_pruner.removals, "refused before anything changed"
    load_checkpoint(path, fresh, fresh_opt, fresh_pruner)  # the retry with the right optimizer works
    assert fresh_pruner.removals == pruner.removals


def test_the_grad_scaler_travels_in_the_checkpoint(tmp_path):
    from fxprune.checkpoint import load_checkpoint, save_checkpoint
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gated, opt, pruner = _ckpt_run(steps=0, scaler=scaler)
    scaler.scale(torch.ones(()))  # the scale is made at its first use
    scaler.update(512.0)
    path = save_checkpoint(tmp_path / "run.ckpt", gated, opt, pruner)
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    load_checkpoint(path, *_ckpt_run(steps=0, scaler=fresh_scaler))
    assert fresh_scaler.get_scale() == 512.0
    with pytest.raises(ValueError, match="GradScaler"):
        load_checkpoint(path, *_ckpt_run(steps=0))  # saved with a scaler, resumed without one


# ---------------------------------------------------------------- minor
