"""Live removal as one transaction: parameters, gradients and optimizer state sliced
together, under torch.compile and any zero_grad, all or nothing; and the training step's
cost (no host synchronisation, a penalty built from index tensors)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from train_loop import MLP

import fxprune
from fxprune import live_compaction, optim_state
from fxprune.digits.models import resnet
from fxprune.state import LayerGate, UnitGate, gate_bank, state_of, theta_of


def first_group(gated):
    return next(iter(state_of(gated).layout.units))


def switch_off_two(gated, pruner, verify=True):
    """Switch off two units of the first group and remove them."""
    gid = first_group(gated)
    theta = theta_of(gated, UnitGate(gid))
    with torch.no_grad():
        theta[:2] = 0.0
    drop = np.zeros(theta.numel(), dtype=bool)
    drop[:2] = True
    return pruner.remove({gid: drop}, set(), verify=verify)


def readme_loop(model, opt, pruner, x, y, steps, set_to_none=True, remove_at=()):
    """The README's order: forward, penalty, zero_grad, backward, step, pruner.step."""
    losses = []
    for step in range(steps):
        loss = F.cross_entropy(model(x), y) + pruner.penalty()
        opt.zero_grad(set_to_none=set_to_none)
        loss.backward()
        opt.step()
        pruner.step()
        losses.append(loss.item())
        if step in remove_at:
            switch_off_two(pruner.gated, pruner)
    return losses


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_training_goes_on_through_three_removals(compiled, set_to_none):
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig("units", check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    model = torch.compile(gated) if compiled else gated
    losses = readme_loop(model, opt, pruner, x, y, 8, set_to_none, remove_at=(1, 3, 5))
    assert len(pruner.removals) == 3 and np.isfinite(losses).all()
    assert theta_of(gated, UnitGate(first_group(gated))).numel() == 12 - 6
    for p in gated.parameters():
        assert p.grad is None or p.grad.shape == p.shape
        for v in opt.state[p].values():
            assert not torch.is_tensor(v) or v.shape in (p.shape, ())
    compact = fxprune.convert(gated.eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-5, atol=1e-6)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, weight_decay=0.0),
    "rmsprop-centered-momentum": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_supported_optimizer_has_its_state_sliced(name):
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig("units", check_every=10**6))
    opt = OPTIMIZERS[name](list(gated.parameters()))
    pruner = fxprune.Pruner(gated, opt)
    readme_loop(gated, opt, pruner, x, y, 3)
    w = gated.get_submodule("layers.0").weight
    before = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v) and v.dim()}
    assert bool(before) == (name != "sgd"), "plain SGD keeps no state, the others per-element state"
    switch_off_two(gated, pruner)
    assert w.shape == (10, 6)
    for k, v in before.items():
        torch.testing.assert_close(opt.state[w][k], v[2:])  # the same entries, the removed ones gone
    readme_loop(gated, opt, pruner, x, y, 3)  # and the optimizer keeps working


def test_what_is_not_an_optimizer_is_refused_by_name():
    """(Optimizers without a declared layout are read by shape: tests/test_optimizers.py.)"""
    x = torch.randn(4, 6)
    gated = fxprune.prepare(MLP(), (x,))
    with pytest.raises(TypeError, match="Adam.*not a torch.optim.Optimizer"):
        fxprune.Pruner(gated, type("Adam", (), {"param_groups": []})())


def snapshot(gated, opt):
    state = state_of(gated)
    return {
        "tensors": {k: v.clone() for k, v in gated.state_dict().items()},
        "grads": {n: p.grad.clone() for n, p in gated.named_parameters() if p.grad is not None},
        "opt": [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in gated.parameters()],
        "groups": [[id(p) for p in g["params"]] for g in opt.param_groups],
        "code": gated.code, "graph": state.graph, "layout": state.layout,
        "theta": gate_bank(gated).theta.detach().clone(),
    }


def assert_same(a, b):
    assert a["code"] == b["code"] and a["graph"] is b["graph"] and a["layout"] is b["layout"]
    assert a["groups"] == b["groups"]
    torch.testing.assert_close(a["theta"], b["theta"])
    for key in ("tensors", "grads"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k])
    for sa, sb in zip(a["opt"], b["opt"]):
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k])


def failing(monkeypatch, module, name, after):
    """Make ``module.name`` raise once, on its call number ``after`` + 1."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == after + 1:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("where", ["set_data", "refresh_module", "delete_unreferenced", "_sync_gates", "counted_run"])
def test_a_removal_that_fails_half_way_leaves_everything_as_it_was(monkeypatch, where):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (x,), fxprune.PruneConfig(check_every=10**6))
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(gated, opt)
    readme_loop(gated, opt, pruner, x, y, 2)
    before = snapshot(gated, opt)
    gated.eval()
    with torch.no_grad():
        out = gated(x)
    gid = first_group(gated)
    with torch.no_grad():
        theta_of(gated, UnitGate(gid))[:3] = 0.0
        theta_of(gated, LayerGate(0)).zero_()
    before = snapshot(gated, opt)
    failing(monkeypatch, live_compaction, where, after=1 if where == "set_data" else 0)
    drop = np.zeros(theta_of(gated, UnitGate(gid)).numel(), dtype=bool)
    drop[:3] = True
    with pytest.raises(RuntimeError, match="injected failure"):
        pruner.remove({gid: drop}, {0})
    assert_same(snapshot(gated, opt), before)
    assert not pruner.removals
    monkeypatch.undo()
    pruner.remove({gid: drop}, {0})  # the same removal succeeds afterwards
    gated.train()
    readme_loop(gated, opt, pruner, x, y, 2)
    del out


def test_removing_a_structure_that_is_on_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    gated = fxprune.prepare(MLP(), (x,))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    before = snapshot(gated, opt)
    gid = first_group(gated)
    with pytest.raises(live_compaction.RemovalError, match=r"gates on \(theta >= 0.5\).*group"):
        pruner.remove({gid: np.arange(12) < 3}, set())
    assert_same(snapshot(gated, opt), before)


def test_state_of_an_unknown_layout_is_refused_before_anything_changes():
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    gated = fxprune.prepare(MLP(), (x,))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    readme_loop(gated, opt, pruner, x, y, 1)
    w = gated.get_submodule("layers.0").weight
    opt.state[w]["trace"] = torch.zeros_like(w)  # a key the SGD layout does not declare
    with torch.no_grad():
        theta_of(gated, UnitGate(first_group(gated)))[:2] = 0.0
    before = snapshot(gated, opt)
    with pytest.raises(optim_state.UnsupportedOptimizer, match="SGD keeps a state entry 'trace'"):
        switch_off_two(gated, pruner)
    assert_same(snapshot(gated, opt), before)


# ---------------------------------------------------------------- batch dims
class SequenceFirst(nn.Module):
    """Sequence-first tokens ``[T, B, C]``, as nn.LSTM and nn.Transformer default to."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc2(F.relu(self.fc1(x)))
        return self.head(F.relu(h).mean(0))


def test_sequence_first_inputs_get_one_mask_per_example_on_their_batch_dim():
    torch.manual_seed(0)
    t = b = 6  # length equal to batch: sampling on the wrong dim would not even fail
    x = torch.ones(t, b, 4)
    gated = fxprune.prepare(SequenceFirst(), (x,), fxprune.PruneConfig("units"), batch_dim=1)
    state = state_of(gated)
    assert state.batch_dims == {"x": 1} and state.example[0].shape == (t, 1, 4)
    assert {r.node: r.batch_dim for r in state.graph.reads} == {"fc1": 1, "fc2": 1, "head": 0}  # after mean(0)
    with torch.no_grad():
        gate_bank(gated).theta.fill_(0.5)
    seen = {}
    read = next(iter(gated.get_submodule("fxprune_reads").values()))
    read.register_forward_hook(lambda m, args, out: seen.update(mask=(out / args[0]).detach()))
    gated.train()
    gated(x)
    mask = seen["mask"]  # [T, B, 16]: every example has its own mask, the same at every position
    live = ~mask[0, 0].isnan()  # channels the ReLU left non-zero (the same for every token: x is all ones)
    assert live.sum() >= 4
    torch.testing.assert_close(mask, mask[:1].expand_as(mask), equal_nan=True)
    assert len({tuple(mask[0, i, live].tolist()) for i in range(b)}) > 1


def test_sequence_first_model_trains_through_removals():
    torch.manual_seed(0)
    x, y = torch.randn(5, 16, 4), torch.randint(0, 3, (16,))
    gated = fxprune.prepare(SequenceFirst(), (x,), fxprune.PruneConfig("units"), batch_dim=1)
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(gated, opt)
    readme_loop(gated, opt, pruner, x, y, 4, remove_at=(1,))
    assert pruner.removals
    compact = fxprune.convert(gated.eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the step's cost
class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_pruner_step_does_not_synchronise_outside_a_check():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    gated = fxprune.prepare(resnet(), (x,), fxprune.PruneConfig(check_every=4))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01)
    pruner = fxprune.Pruner(gated, opt)
    syncs = []
    for _ in range(8):
        loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with CountOps() as counter:
            pruner.step()
        syncs.append(counter.syncs)
    assert [s for i, s in enumerate(syncs) if (i + 1) % 4] == [0] * 6 and syncs[3] > 0


def test_penalty_is_a_fixed_number_of_ops_per_weight_tensor():
    """No Python loop over units or gates: the penalty costs a few ops per weight tensor
    (its squares and their sums) plus a constant, whatever the widths."""
    counts = {}
    for width in (1, 4):
        gated = fxprune.prepare(resnet(width=width), (torch.randn(2, 1, 8, 8),))
        pruner = fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.01))
        with CountOps() as counter:
            pruner.penalty()
        counts[width] = (counter.ops, len(pruner.objective.weights))
    (ops1, n1), (ops4, n4) = counts[1], counts[4]
    assert n1 == n4 and ops1 == ops4 and ops1 <= 2 * n1 + 60


class LinearBottleneck(nn.Module):
    """MobileNetV2/V3's shape: a residual add with no activation after it, whose output the
    next convolution reads directly."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.block = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1),
                                   nn.BatchNorm2d(8))
        self.next = nn.Conv2d(8, 12, 3, padding=1)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        h = self.stem(x)
        h = self.block(h) + h  # torchvision's InvertedResidual: the branch first
        return self.head(F.relu(self.next(h)).mean((2, 3)))


def test_a_branch_whose_add_the_next_layer_reads_directly_is_removed_live():
    """mobilenet_v3_small: a removal of features.8's branch raised KeyError in _sync_gates (the
    next conv's gate read the erased add's space, which no node carried any more)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    gated = fxprune.prepare(LinearBottleneck(), (x,), fxprune.PruneConfig(check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    readme_loop(gated, opt, pruner, x, y, 2)
    with torch.no_grad():
        theta_of(gated, LayerGate(0)).zero_()
    gated.eval()
    with torch.no_grad():
        out = gated(x)
    pruner.remove({}, {0})
    with torch.no_grad():
        torch.testing.assert_close(gated(x), out, rtol=1e-4, atol=1e-5)
    gated.train()
    readme_loop(gated, opt, pruner, x, y, 2)
    gid = first_group(gated)  # a later removal still finds the space the next conv reads
    with torch.no_grad():
        theta_of(gated, UnitGate(gid))[:2] = 0.0
    drop = np.zeros(theta_of(gated, UnitGate(gid)).numel(), dtype=bool)
    drop[:2] = True
    pruner.remove({gid: drop}, set())
    readme_loop(gated, opt, pruner, x, y, 2)
    gated.eval()
    with torch.no_grad():
        trained = gated(x)
        torch.testing.assert_close(fxprune.convert(gated)(x), trained, rtol=1e-4, atol=1e-5)
