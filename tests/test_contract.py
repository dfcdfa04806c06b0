"""The ChannelGraph as the one contract: what every consumer reads must be right for the
cases that were silently wrong (shortcuts residualize adds, tied weights, literal channel
counts, a size read from one tensor used to reshape another, unused layers)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cost import check_vertices, monte_carlo
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxprune
from fxprune.digits.models import lenet_300_100, resnet, vgg
from fxprune.state import state_of
from fxprune.testing import implied_param_count, random_masks


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def converts_equivalently(model, x, keep=0.5, seed=0):
    gated = random_masks(fxprune.prepare(model.eval(), (x,)), keep=keep, seed=seed).eval()
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        assert rel_err(compact(x), gated(x)) <= 1e-5
        assert rel_err(torch.export.export(compact, (x,)).module()(x), gated(x)) <= 1e-5
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)
    return gated, compact


# ---------------------------------------------------------------- residualize's shortcuts
@pytest.mark.parametrize("build", [lenet_300_100, lambda: vgg(0.25)], ids=["lenet-300-100", "vgg"])
def test_residualized_cost_counts_the_shortcuts(build):
    """The shortcut projections residualize adds are weights like any other: the cost at
    0/1 gates equals FlopCounterMode and the parameter count on the compact model."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm = fxprune.residualize(build(), (x,))
    objective = fxprune.objective.Objective(fxprune.prepare(gm, (x,)))
    assert objective.dense_params == sum(p.numel() for p in gm.parameters())
    check_vertices(gm, x)


def test_residualized_cost_is_the_mean_over_sampled_masks():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm = fxprune.residualize(lenet_300_100(0.1), (x,))
    want, mean, se = monte_carlo(gm, x, lambda rng, n: rng.uniform(0.3, 1.0, n), samples=300, seed=1)
    for w, m, s in zip(want, mean, se):
        assert abs(w - m) <= 3.5 * s


# ---------------------------------------------------------------- tied weights
class TiedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(F.relu(self.b(F.relu(self.a(F.relu(self.inp(x)))))))


class TiedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        return self.head((F.relu(self.a(h)) * F.relu(self.b(h))).mean((2, 3)))


@pytest.mark.parametrize("model, shape", [(TiedLinear, (4, 4)), (TiedConv, (2, 3, 6, 6))], ids=["linear", "conv"])
def test_tied_weights_are_one_tensor(model, shape):
    torch.manual_seed(0)
    m, x = model(), torch.randn(*shape)
    cg = fxprune.channel_graph(fxprune.prepare(m, (x,)))
    tied = [p for p in cg.params.values() if len(p.names) > 1]
    assert [set(p.names) for p in tied] == [{"a.weight", "b.weight"}]
    for seed in range(3):
        gated, compact = converts_equivalently(m, x, seed=seed)
    assert compact.a.weight is compact.b.weight
    check_vertices(m, x)


# ---------------------------------------------------------------- literal channel counts
class Expand(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        s = torch.sigmoid(self.b(y).mean((2, 3), keepdim=True))
        return self.c(y * s.expand(-1, 8, 6, 6))


class Unflatten(nn.Module):
    def __init__(self, method: bool):
        super().__init__()
        self.method = method
        self.fc, self.u, self.c = nn.Linear(5, 8), nn.Unflatten(1, (8, 1, 1)), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.fc(x))
        return self.c(y.unflatten(1, (8, 1, 1)) if self.method else self.u(y))


@pytest.mark.parametrize("model, shape", [
    (Expand, (2, 3, 6, 6)), (lambda: Unflatten(False), (2, 5)), (lambda: Unflatten(True), (2, 5)),
], ids=["expand", "nn.Unflatten", "Tensor.unflatten"])
def test_literal_channel_counts_are_rewritten(model, shape):
    torch.manual_seed(0)
    m, x = model(), torch.randn(*shape)
    cg = fxprune.channel_graph(fxprune.prepare(m, (x,)))
    assert any(r.kind == "sizes" for r in cg.rewrites) and cg.prunable_groups
    for seed in range(3):
        converts_equivalently(m, x, seed=seed)


# ---------------------------------------------------------------- sizes read from a shape
class ShapeOfAnother(nn.Module):
    """``B, N, C = x.shape`` then ``y.reshape(B, N, C)`` where y's channels are not x's
    (timm's nextvit, which converted into a model that failed on its first call)."""

    def __init__(self):
        super().__init__()
        self.inp, self.proj, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.inp(x))
        b, n, c = x.shape
        y = self.proj(x).transpose(1, 2).reshape(b, -1, n).transpose(1, 2).reshape(b, n, c)
        return self.out(F.relu(y))


def test_a_size_read_from_one_tensor_reshapes_another_with_its_own_kept_count():
    """The two groups keep different channels: the reshape is given the reshaped dim's own
    kept count (before, both were frozen; before that, the compact model failed)."""
    torch.manual_seed(0)
    m, x = ShapeOfAnother(), torch.randn(2, 5, 3)
    cg = fxprune.channel_graph(fxprune.prepare(m, (x,)))
    inp = next(g for g in cg.groups.values() if any(b.owner == "inp" and b.role == "producer" for b in cg.bindings_of(g)))
    proj = next(g for g in cg.groups.values() if any(b.owner == "proj" and b.role == "producer" for b in cg.bindings_of(g)))
    assert inp is not proj and inp.prunable and proj.prunable
    assert any(r.kind == "sizes" and cg.spaces[r.spaces[0]].group == proj.id for r in cg.rewrites)
    for seed in range(3):
        converts_equivalently(m, x, seed=seed)


class ShapeOfItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        b, c, h, w = y.shape
        return self.b(y.reshape(b, c, h * w).reshape(b, c, h, w))


def test_a_size_read_from_the_reshaped_tensor_stays_prunable():
    m, x = ShapeOfItself(), torch.randn(2, 3, 4, 4)
    cg = fxprune.channel_graph(fxprune.prepare(m, (x,)))
    assert len(cg.prunable_groups) == 1
    converts_equivalently(m, x)


# ---------------------------------------------------------------- counts and shares
class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.pooler = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.a(x))
        self.pooler(h)  # computed, never used: convert deletes it
        return self.b(h)


def test_implied_count_leaves_out_what_convert_deletes():
    m, x = WithUnusedLayer(), torch.randn(2, 4)
    gated, compact = converts_equivalently(m, x)
    assert "pooler" not in dict(compact.named_modules())
    assert not fxprune.channel_graph(gated).params["pooler.weight"].used


def test_prunable_share_counts_every_conv_and_linear_channel():
    class Opaque(nn.Module):  # not traceable: a leaf whose layers the analysis cannot see
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), Opaque(), nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 2, 1))
    cg = fxprune.channel_graph(fxprune.prepare(m, (torch.randn(2, 3, 4, 4),)))
    prunable, total = cg.prunable_share()
    assert total == 8 + 8 + 6 + 2  # the leaf's conv counts too
    assert prunable == 6  # conv 3 only: conv 0 feeds the leaf, the last feeds the output


# ---------------------------------------------------------------- restrict
def test_restricted_graph_has_nothing_stale():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    gated = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), (x,))
    opt = torch.optim.SGD(gated.parameters(), lr=0.1)
    pruner = fxprune.Pruner(gated, opt)
    cg = fxprune.channel_graph(gated)
    branch = next(iter(cg.branches.values()))
    gid = cg.prunable_groups[-1].id
    with torch.no_grad():
        fxprune.state.theta_of(gated, fxprune.LayerGate(branch.id)).zero_()
        fxprune.state.theta_of(gated, fxprune.UnitGate(gid))[:2] = 0.0
    n = cg.groups[gid].num_units
    pruner.remove({gid: np.arange(n) < 2}, {branch.id})
    new = fxprune.channel_graph(gated)
    new.check()
    assert branch.id not in new.branches and new.groups[gid].num_units == n - 2
    live = {n.name for n in gated.graph.nodes}
    assert all(s.node in live for s in new.spaces.values())
    assert all(r.node in live for r in new.reads) and all(r.node in live for r in new.rewrites)
    assert all(set(br.nodes) <= live for br in new.branches.values())
    named = dict(gated.named_parameters(remove_duplicate=False))
    for p in new.params.values():
        if not p.buffer:
            assert all(tuple(named[k].shape) == p.shape for k in p.names)
    assert not set(branch.params) & set(new.params)


# ---------------------------------------------------------------- convert's memory
class CountAllocations(TorchDispatchMode):
    """Bytes of every new storage an aten op returns (what convert allocates)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.seen = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.seen:
                    self.seen.add(storage.data_ptr())
                    self.bytes += storage.nbytes()
        return out


def test_convert_allocates_the_compact_model_not_a_copy_of_the_gated_one():
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64 if not _ else 512, 512), nn.ReLU())],
                          nn.Linear(512, 10))
    gated = random_masks(fxprune.prepare(model, (x,)), keep=0.25, seed=0).eval()
    counter = CountAllocations()
    counter.seen = {t.untyped_storage().data_ptr() for t in [*gated.parameters(), *gated.buffers()]}
    with counter:
        compact = fxprune.convert(gated)
    gated_bytes = sum(t.numel() * t.element_size() for t in [*gated.parameters(), *gated.buffers()])
    compact_bytes = sum(t.numel() * t.element_size() for t in [*compact.parameters(), *compact.buffers()])
    assert compact_bytes < 0.2 * gated_bytes
    # the compact tensors, the example run and slicing temporaries (counted once per storage address, so
    # the sum moves with the allocator's reuse of addresses), far below a copy of the gated model
    assert counter.bytes <= 2 * compact_bytes + 2**16 < 0.5 * gated_bytes
    gated_storage = {t.untyped_storage().data_ptr() for t in gated.parameters()}
    assert not gated_storage & {t.untyped_storage().data_ptr() for t in compact.parameters()}


def test_convert_checks_its_result_against_the_gated_model():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    gated = random_masks(fxprune.prepare(Expand(), (x,)), keep=0.5, seed=0).eval()
    state_of(gated).graph.rewrites.clear()  # a contract with a rewrite missing
    with pytest.raises((fxprune.passes.CompactionError, RuntimeError)):
        fxprune.convert(gated)


class NormShapeOfAnother(nn.Module):
    """``F.layer_norm(y, (x.shape[-1],))`` where y's channels are not x's."""

    def __init__(self):
        super().__init__()
        self.inp, self.proj, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.w, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

    def forward(self, x):
        x = F.relu(self.inp(x))
        return self.out(F.layer_norm(self.proj(x), (x.shape[-1],), self.w, self.b))


def test_a_norm_given_another_tensors_channel_count_normalises_its_own_kept_channels():
    """Before, both groups were frozen (the count was tied like a reshape's); the normalised
    shape is rewritten to the normalised tensor's own kept count anyway."""
    torch.manual_seed(0)
    m, x = NormShapeOfAnother(), torch.randn(2, 5, 3)
    cg = fxprune.channel_graph(fxprune.prepare(m, (x,)))
    assert all(g.prunable for g in cg.groups.values() if any(b.owner in ("inp", "proj") for b in cg.bindings_of(g)
                                                               if b.role == "producer"))
    for seed in range(3):
        converts_equivalently(m, x, seed=seed)


@pytest.mark.parametrize("make", [
    lambda: fxprune.passes.Read("n", 0, 1, 1, 0, "masks"),
    lambda: fxprune.passes.Rewrite("n", "size", 0, (1,)),
    lambda: fxprune.passes.Binding("w", 0, 1, "produce", "layer"),
])
def test_a_misspelt_kind_is_refused_where_the_record_is_made(make):
    with pytest.raises(ValueError, match="is not one of"):
        make()
