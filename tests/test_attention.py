"""Attention heads: q/k/v viewed into (heads, head_dim) and attended with
``F.scaled_dot_product_attention`` are pruned a whole head at a time (q, k, v rows and the
output projection's columns together); the compact model has fewer heads and equals the
gated one."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_loop import train_steps

import fxprune
from fxprune.state import UnitGate, state_of, theta_of
from fxprune.testing import implied_param_count, random_masks


class PackedAttention(nn.Module):
    """timm's layout: one qkv projection reshaped to (3, heads, head_dim), literal sizes."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class SplitAttention(nn.Module):
    """Separate q, k and v projections viewed with a -1 head dim, as most language models do."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


class ExplicitAttention(PackedAttention):
    """timm's non-fused path (and Swin's): ``softmax(q @ k^T * scale) @ v`` with matmuls."""

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class Transformer(nn.Module):
    def __init__(self, attention: type, d: int = 5, dim: int = 16, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(d, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * depth))
        self.attns = nn.ModuleList(attention(dim, heads) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
            x = x + attn(self.norms[2 * i](x))
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(x.mean(1))


def output_group(gated, layer):
    cg = state_of(gated).graph
    return next(cg.group_of(b.space) for b in cg.bindings if b.owner == layer and b.role == "producer")


def factor_groups(gated, layer, which, param=None):
    """The groups of factor ``which`` (0: heads, 1: head_dim) of ``layer``'s output (or of
    ``param``'s dim 0), a product group."""
    cg = state_of(gated).graph
    g = output_group(gated, layer) if param is None else next(
        cg.group_of(b.space) for b in cg.bindings if b.param == param and b.dim == 0)
    assert g.derived, f"'{layer or param}' output is not a product of heads and head_dim: {g.frozen}"
    return [cg.groups[f] for f in g.factor_ids()[which]]


def head_group(gated, layer, param=None):
    (heads,) = factor_groups(gated, layer, 0, param)
    return heads


def switch_off_and_remove(gated, pruner, drops):
    """Switch off units ``drops[group id]`` (indices of 4 units) and remove them live."""
    with torch.no_grad():
        for gid, units in drops.items():
            theta_of(gated, UnitGate(gid))[units] = 0.0
    pruner.remove({gid: np.isin(np.arange(4), units) for gid, units in drops.items()}, set())


def trains_through_removal(attention, drops_of, check):
    """Train a two-block transformer five steps, removing ``drops_of(gated)`` (group id -> unit
    indices) live after the second; ``check(gated)`` the widths, then compact = gated."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6, 5), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(Transformer(attention), (x,), fxprune.PruneConfig("units", gamma=1.0, check_every=10**6))
    opt = torch.optim.AdamW(gated.parameters(), lr=1e-2, weight_decay=0.0)
    pruner = fxprune.Pruner(gated, opt)
    drops = drops_of(gated)
    losses = []
    for step in range(5):
        losses.append(train_steps(gated, opt, pruner, [(x, y)]))
        if step == 1:
            switch_off_and_remove(gated, pruner, drops)
    assert np.isfinite(losses).all()
    check(gated)
    compact = fxprune.convert(gated.eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", [PackedAttention, SplitAttention, ExplicitAttention])
def test_whole_heads_are_units_tied_across_q_k_v_and_the_output_projection(attention):
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(attention), (x,))
    first = "attns.0.q" if attention is SplitAttention else "attns.0.qkv"
    g = head_group(gated, first)
    assert g.prunable and g.num_units == 4, g.frozen
    if attention is SplitAttention:
        assert head_group(gated, "attns.0.k") is g is head_group(gated, "attns.0.v")
    cg = state_of(gated).graph
    consumers = {b.owner for b in cg.bindings if b.role == "consumer" and cg.group_of(b.space).derived
                 and g.id in cg.group_of(b.space).factors[0]}
    assert consumers == {"attns.0.o" if attention is SplitAttention else "attns.0.proj"}
    prunable, total = cg.prunable_share()
    assert prunable == total - 3  # all but the logits: heads, the residual stream, the MLP units


@pytest.mark.parametrize("attention", [PackedAttention, SplitAttention, ExplicitAttention])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75])
def test_compact_model_with_fewer_heads_equals_the_gated_one(attention, keep):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = random_masks(fxprune.prepare(Transformer(attention), (x,)), keep=keep, seed=2).eval()
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)
    ep = torch.export.export(compact, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), gated(x), rtol=1e-4, atol=1e-5)


def test_packed_attention_keeps_its_literal_head_count_in_step_with_the_heads_kept():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(PackedAttention), (x,))
    g = head_group(gated, "attns.0.qkv")
    theta = theta_of(gated, UnitGate(g.id))
    with torch.no_grad():
        theta[[0, 2]] = 0.0
    compact = fxprune.convert(gated.eval())
    assert compact.get_submodule("attns.0.qkv").out_features == 3 * 2 * 4
    assert "3, 2, 4)" in compact.code  # reshape(B, N, 3, heads, head_dim) with the heads kept
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)


def test_a_transformer_trains_through_live_head_removal_and_converts():
    def check(gated):  # one head of the second block gone
        assert gated.get_submodule("attns.1.q").out_features == 12 and gated.get_submodule("attns.1.o").in_features == 12

    trains_through_removal(SplitAttention, lambda gated: {head_group(gated, "attns.1.q").id: [1]}, check)


class MHABlock(nn.Module):
    """Self-attention with nn.MultiheadAttention (torchvision's ViT layout), and optionally
    a cross-attention to a second, fixed memory, which is kept whole."""

    def __init__(self, batch_first: bool, cross: bool = False) -> None:
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.embed, self.head = nn.Linear(5, 16), nn.Linear(16, 3)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.memory = nn.Parameter(torch.randn(1, 3, 16))
        self.xattn = nn.MultiheadAttention(16, 2, batch_first=True) if cross else None

    def forward(self, x):
        t = self.embed(x)
        y, _ = self.attn(t, t, t, need_weights=False)  # torchvision's spelling: the weights unpacked, unused
        t = t + y
        if self.cross:
            m = self.memory.expand(t.shape[0], -1, -1)
            t = t + self.xattn(t, m, m)[0]
        return self.head(t.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_self_attention_is_written_out_and_pruned_by_heads(batch_first):
    torch.manual_seed(0)
    model = MHABlock(batch_first).eval()
    x = torch.randn(3, 6, 5) if batch_first else torch.randn(6, 3, 5)
    gated = fxprune.prepare(model, (x,), fxprune.PruneConfig("units"), batch_dim=0 if batch_first else 1).eval()
    with torch.no_grad():
        torch.testing.assert_close(gated(x), model(x), rtol=1e-5, atol=1e-6)
    cg = state_of(gated).graph
    g = head_group(gated, None, "attn.in_proj_weight")
    assert g.prunable and g.num_units == 4
    prunable, total = cg.prunable_share()
    assert (prunable, total) == (16 + 48 + 16, 16 + 48 + 16 + 3)  # embed, in_proj, out_proj (counted once); the logits
    random_masks(gated, keep=0.5, seed=0)
    compact = fxprune.convert(gated).eval()
    (dims,) = factor_groups(gated, None, 1, "attn.in_proj_weight")  # packed: q, k and v share their head_dim
    kept = [int(theta_of(gated, UnitGate(f.id)).ge(0.5).sum()) for f in (g, dims)]
    assert kept[0] < 4 and kept[1] < 4
    assert compact.attn.in_proj_weight.shape[0] == 3 * kept[0] * kept[1]
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)


def test_cross_attention_with_multihead_attention_is_kept_whole_and_says_so():
    x = torch.randn(3, 6, 5)
    cg = state_of(fxprune.prepare(MHABlock(True, cross=True), (x,))).graph
    g = next(cg.group_of(b.space) for b in cg.bindings if b.param == "embed.weight" and b.dim == 0)
    assert not g.prunable and any("nn.MultiheadAttention 'xattn'" in why for why in g.frozen)


class BiasedAttention(SplitAttention):
    """A relative-position-style bias per head, gathered from a parameter table and given
    to SDPA as its mask (timm's MaxViT / CoAtNet)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads)
        self.table = nn.Parameter(torch.randn(11, heads))
        self.register_buffer("index", torch.randint(0, 11, (6, 6)), persistent=False)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        bias = self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


def test_a_per_head_bias_read_from_a_table_follows_the_heads():
    """The table's head columns go with the heads (a tensor index carries the table's
    channels); before, the bias was untracked and kept the heads whole."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(BiasedAttention), (x,), mode="eval")
    g = head_group(gated, "attns.0.q")
    assert g.prunable and g.num_units == 4, g.frozen
    compact = fxprune.convert(random_masks(gated, keep=0.5, seed=0).eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
    kept = int(theta_of(gated, UnitGate(g.id)).ge(0.5).sum())
    assert compact.get_parameter("attns.0.table").shape == (11, kept)


def test_a_transformer_resumes_from_a_checkpoint_after_removals_on_the_same_trajectory(tmp_path):
    from fxprune.checkpoint import load_checkpoint, save_checkpoint

    config = fxprune.PruneConfig("both", gamma=200.0, theta_lr=2.0, warmup=0, check_every=2, patience=1, w_tol=1e3)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(10)]

    def build():
        torch.manual_seed(0)
        gated = fxprune.prepare(Transformer(PackedAttention), (data[0][0],), config)
        opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
        return gated, opt, fxprune.Pruner(gated, opt)

    whole = train_steps(*build(), data)
    gated, opt, pruner = build()
    first = train_steps(gated, opt, pruner, data[:5])
    assert pruner.removals, "the config must remove structures before the checkpoint"
    save_checkpoint(tmp_path / "run.ckpt", gated, opt, pruner, step=5)
    gated2, opt2, pruner2 = build()
    load_checkpoint(tmp_path / "run.ckpt", gated2, opt2, pruner2)
    rest = train_steps(gated2, opt2, pruner2, data[5:])
    assert first + rest == pytest.approx(whole, rel=1e-6, abs=1e-7)


class GroupedQueryAttention(nn.Module):
    """4 query heads sharing 2 key/value heads, by ``repeat_interleave`` or SDPA's ``enable_gqa``."""

    def __init__(self, dim: int, heads: int, kv_heads: int = 2, native: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.native = heads, kv_heads, dim // heads, native
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv_heads * self.head_dim), nn.Linear(dim, kv_heads * self.head_dim)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k, v = (p(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2) for p in (self.k, self.v))
        if self.native:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            rep = self.heads // self.kv_heads
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))
        return self.o(y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class NativeGQA(GroupedQueryAttention):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads, native=True)


@pytest.mark.parametrize("attention", [GroupedQueryAttention, NativeGQA], ids=["repeat_interleave", "enable_gqa"])
def test_grouped_query_heads_are_pruned_with_the_query_heads_that_share_them(attention):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    gated = fxprune.prepare(Transformer(attention), (x,), fxprune.PruneConfig("units"))
    g = head_group(gated, "attns.0.q")
    assert g.prunable and g.num_units == 2, g.frozen  # a unit: one k/v head and its two query heads
    assert head_group(gated, "attns.0.k") is g is head_group(gated, "attns.0.v")
    theta = theta_of(gated, UnitGate(g.id))
    with torch.no_grad():
        theta[0] = 0.0
    compact = fxprune.convert(gated.eval())
    assert compact.get_submodule("attns.0.q").out_features == 8 and compact.get_submodule("attns.0.k").out_features == 4
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
    random_masks(gated, keep=0.5, seed=3)
    compact = fxprune.convert(gated.eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
