"""Head dims: the entries of a head's q/k (shared) and v (its own) are units too; the
compact model with fewer head dims equals the gated one and keeps the dense attention
scale; rotary tables, cosine attention, live removals and heads that share units."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_attention import (
    ExplicitAttention,
    GroupedQueryAttention,
    NativeGQA,
    PackedAttention,
    SplitAttention,
    Transformer,
    factor_groups,
    head_group,
    output_group,
    switch_off_and_remove,
    trains_through_removal,
)
from torch import nn

import fxprune
from fxprune.state import UnitGate, state_of, theta_of
from fxprune.testing import implied_param_count, random_masks

def kept(gated, group):
    return int(theta_of(gated, UnitGate(group.id)).ge(0.5).sum())


@pytest.mark.parametrize("attention", [PackedAttention, SplitAttention, ExplicitAttention, GroupedQueryAttention, NativeGQA])
def test_head_dim_entries_are_units_shared_by_q_and_k_and_by_v_on_its_own(attention):
    """A head_dim entry is one unit: the same entry of every head. q and k share theirs
    (the query-key dot product sums over it); v's are its own, read by the output
    projection. A packed projection viewed once has one head_dim for q, k and v."""
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(attention), (x,))
    if attention in (PackedAttention, ExplicitAttention):
        dims = factor_groups(gated, "attns.0.qkv", 1)
        assert len(dims) == 1
    else:
        (qk,) = factor_groups(gated, "attns.0.q", 1)
        assert [g.id for g in factor_groups(gated, "attns.0.k", 1)] == [qk.id]
        (v,) = factor_groups(gated, "attns.0.v", 1)
        assert v.id != qk.id
        dims = [qk, v]
    assert all(g.prunable and g.num_units == 4 and not g.derived for g in dims)
    assert {g.id for g in dims}.isdisjoint({head_group(gated, "attns.0.q" if len(dims) == 2 else "attns.0.qkv").id})


@pytest.mark.parametrize("attention", [PackedAttention, SplitAttention, ExplicitAttention, NativeGQA])
def test_compact_model_with_fewer_head_dims_equals_the_gated_one_and_keeps_the_dense_scale(attention):
    """Removing head_dim entries shrinks every head; SDPA's default scale, 1/sqrt(head_dim),
    is the dense model's in the compact one (else its scores would change)."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(attention), (x,), fxprune.PruneConfig("units"))
    first = "attns.0.qkv" if attention in (PackedAttention, ExplicitAttention) else "attns.0.q"
    with torch.no_grad():
        for g in factor_groups(gated, first, 1) + (factor_groups(gated, "attns.0.v", 1) if first == "attns.0.q" else []):
            theta_of(gated, UnitGate(g.id))[[0, 3]] = 0.0
    compact = fxprune.convert(gated.eval())
    if first == "attns.0.qkv":
        assert compact.get_submodule("attns.0.qkv").out_features == 3 * 4 * 2
    else:
        assert compact.get_submodule("attns.0.q").out_features == 4 * 2 and compact.get_submodule("attns.0.o").in_features == 8
    if attention is not ExplicitAttention:
        assert "scale = 0.5" in compact.code  # 1/sqrt(4), the dense head_dim
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)


@pytest.mark.parametrize("attention", [SplitAttention, PackedAttention, GroupedQueryAttention])
def test_expected_parameters_count_a_head_and_its_head_dim_as_two_gates(attention):
    """The cost of a projection indexed by heads x head_dim is bilinear in their thetas:
    exact at 0/1 gates and the mean over sampled masks at any theta."""
    from fxprune.objective import Objective
    from fxprune.state import gate_bank

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(attention), (x,), fxprune.PruneConfig("units"))
    objective = Objective(gated)
    for seed in range(3):
        random_masks(gated, keep=0.5, seed=seed)
        with torch.no_grad():
            params = float(objective.expected()[1])
        assert params == pytest.approx(sum(p.numel() for p in fxprune.convert(gated).parameters()), rel=1e-6)
    theta = gate_bank(gated).theta
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.2, 0.9, theta.numel())
    with torch.no_grad():
        theta.copy_(torch.as_tensor(probs, dtype=torch.float32))
        want = float(objective.expected()[1])
    draws = []
    for _ in range(300):
        with torch.no_grad():
            theta.copy_(torch.as_tensor(rng.random(len(probs)) < probs, dtype=torch.float32))
            draws.append(float(objective.expected()[1]))  # exact at masks (above): the count of that mask
    assert want == pytest.approx(np.mean(draws), abs=4 * np.std(draws) / np.sqrt(len(draws)))


class RotaryAttention(SplitAttention):
    """A language model's rotary embedding: q and k rotated by cos/sin tables computed from
    the positions, over their head_dim; v is not rotated."""

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        d = self.q.out_features // self.heads
        angle = torch.arange(N, device=x.device)[:, None] * torch.arange(d, device=x.device)[None, :] / d
        cos, sin = angle.cos(), angle.sin()

        def rotate(t):
            return t * cos + torch.cat([-t[..., d // 2:], t[..., : d // 2]], dim=-1) * sin

        y = F.scaled_dot_product_attention(rotate(q), rotate(k), v)
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


def test_rotary_tables_freeze_q_and_k_head_dim_only():
    """A head_dim that cannot be pruned (computed rotary tables) stays whole and says why;
    the heads and v's head_dim stay prunable."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(RotaryAttention), (x,), fxprune.PruneConfig("units"))
    cg = state_of(gated).graph
    q = output_group(gated, "attns.0.q")
    assert not q.derived and q.prunable and q.num_units == 4  # tied to the heads in blocks, as a plain view
    frozen = [g for g in cg.groups.values() if g.frozen and any("views channels into (4, 4)" in why for why in g.frozen)]
    assert frozen and any(cg.spaces[s].node.startswith("view") for g in frozen for s in g.spaces)  # q's and k's head_dim
    (v,) = factor_groups(gated, "attns.0.v", 1)
    assert v.prunable and v.num_units == 4
    compact = fxprune.convert(random_masks(gated, keep=0.5, seed=1).eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)


def test_a_transformer_trains_through_live_head_dim_removal_and_converts():
    def drops(gated):  # head_dim entries of q/k and of v in the second block
        (qk,), (v,) = factor_groups(gated, "attns.1.q", 1), factor_groups(gated, "attns.1.v", 1)
        return {qk.id: [0], v.id: [1, 2]}

    def check(gated):
        assert gated.get_submodule("attns.1.q").out_features == 4 * 3 and gated.get_submodule("attns.1.v").out_features == 4 * 2
        assert gated.get_submodule("attns.1.o").in_features == 8

    trains_through_removal(SplitAttention, drops, check)


class CosineAttention(SplitAttention):
    """Swin V2's attention: cosine similarity of q and k (``F.normalize`` over head_dim)
    times a per-head learnt scale computed from a parameter, and a mask made with
    ``new_zeros``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(heads, 1, 1) + 1))

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=4.6).exp() + x.new_zeros(N, N)
        y = attn.softmax(dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("front_end", ["symbolic", "export"])
def test_cosine_attention_prunes_heads_and_v_head_dim(front_end):
    """q's and k's head_dim are normalised (kept whole, named); the heads, with their
    learnt scales, and v's head_dim are pruned."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(CosineAttention), (x,), fxprune.PruneConfig("units"), front_end=front_end)
    heads = head_group(gated, None, "attns.0.v.weight")
    assert heads.prunable and heads.num_units == 4, heads.frozen
    (v,) = factor_groups(gated, None, 1, "attns.0.v.weight")
    assert v.prunable and v.num_units == 4
    q = output_group(gated, "attns.0.q")
    assert q.prunable and not q.derived  # its head_dim is whole: tied to the heads in blocks
    compact = fxprune.convert(random_masks(gated, keep=0.5, seed=0).eval())
    assert compact.get_parameter("attns.0.logit_scale").shape[0] == kept(gated, heads)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)


def test_expected_flops_of_attention_written_out_follow_heads_and_head_dim():
    """``q @ k^T`` (heads x q/k head_dim) and ``attn @ v`` (heads x v's head_dim) are terms of
    the cost: exact at 0/1 gates, as FlopCounterMode counts the compact model."""
    from fxprune.cost import forward_flops
    from fxprune.objective import Objective

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(ExplicitAttention), (x,), fxprune.PruneConfig("units"))
    cg = state_of(gated).graph
    assert sorted(len(o.spaces) for o in cg.op_flops) == [2, 2, 2, 2]  # two products per block, each over two dims
    objective = Objective(gated)
    for seed in range(3):
        random_masks(gated, keep=0.5, seed=seed)
        with torch.no_grad():
            flops = float(objective.expected()[0])
        assert flops == pytest.approx(forward_flops(fxprune.convert(gated), state_of(gated).example), rel=1e-9)


def test_head_shape_follows_live_removals():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5)
    gated = fxprune.prepare(Transformer(PackedAttention), (x,), fxprune.PruneConfig("units"))
    cg = state_of(gated).graph
    assert cg.head_shape("attns.0.qkv") == (4, 4) and cg.head_shape("mlps.0.0") is None
    heads, (dims,) = head_group(gated, "attns.0.qkv"), factor_groups(gated, "attns.0.qkv", 1)
    switch_off_and_remove(gated, fxprune.Pruner(gated, torch.optim.SGD(gated.parameters(), lr=0.1)),
                          {heads.id: [0], dims.id: [1, 2]})
    assert state_of(gated).graph.head_shape("attns.0.qkv") == (3, 2)
    assert gated.get_submodule("attns.0.qkv").out_features == 3 * 3 * 2


class CopiedHeads(nn.Module):
    """Two heads that are copies of one projection (``cat([a, a])`` viewed into 2 heads):
    a channel of ``a`` is in both heads, so heads x head_dim is not a product of its units."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.out = nn.Linear(5, 8), nn.Linear(8, 4), nn.Linear(8, 3)

    def forward(self, x):
        B, N, _ = x.shape
        a = self.a(self.inp(x))
        y = torch.cat([a, a], -1).view(B, N, 2, 4).transpose(1, 2)
        y = F.scaled_dot_product_attention(y, y, y * 2)
        return self.out(y.transpose(1, 2).reshape(B, N, 8)).mean(1)


def test_heads_that_share_units_fall_back_to_a_plain_view():
    """Before, the factors of a unit were those of its last channel (head 1): removing head
    0 removed nothing of ``a`` and the compact model was wrong."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(CopiedHeads(), (x,), fxprune.PruneConfig("units"))
    cg = state_of(gated).graph
    assert not any(g.derived for g in cg.groups.values())
    assert any("tied to different heads" in why for g in cg.groups.values() for why in g.frozen)
    for seed in range(3):
        compact = fxprune.convert(random_masks(gated, keep=0.5, seed=seed).eval())
        with torch.no_grad():
            torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)


class ShapeReadAttention(PackedAttention):
    """timm's older layout: the output reshaped with the input's channel count, read from
    its shape (``B, N, C = x.shape; ...reshape(B, N, C)``): the residual width, not the
    heads'."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def test_a_reshape_to_a_channel_count_read_from_another_tensor_gets_its_own_kept_size():
    """Before, the attention output and the residual stream were frozen ('reshapes with the
    channel count of ...'): they keep different channels. The count is written in as the
    reshaped dim's own kept size instead."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(ShapeReadAttention), (x,), fxprune.PruneConfig("units"))
    cg = state_of(gated).graph
    prunable, total = cg.prunable_share()
    assert prunable == total - 3 and head_group(gated, "attns.0.qkv").prunable
    for seed in range(3):
        compact = fxprune.convert(random_masks(gated, keep=0.5, seed=seed).eval())
        with torch.no_grad():
            torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
        assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)
