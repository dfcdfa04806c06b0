"""Dependency analysis: groups, units, roles, branches and frozen reasons on small models."""

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxprune
from fxprune.testing import random_masks


def analyze(model, x):
    return fxprune.analyze(fxprune.trace(model.eval(), (x,)))


def group_of_producer(cg, owner):
    return next(cg.group_of(b.space) for b in cg.bindings if b.owner == owner and b.role == "producer")


def test_resnet_residual_stream_is_one_group_and_blocks_are_branches():
    cg = analyze(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    stream = group_of_producer(cg, "conv1")
    assert stream is group_of_producer(cg, "layer1.0.conv2") is group_of_producer(cg, "layer1.1.conv2")
    assert stream.prunable and stream.num_units == 64
    assert group_of_producer(cg, "layer2.0.conv2") is group_of_producer(cg, "layer2.0.downsample.0")
    assert len(cg.branches) == 8  # every block: removing F leaves the identity or the projection shortcut
    assert not any("downsample" in n for br in cg.branches.values() for n in br.nodes)
    assert all(len(b.nodes) == 5 for b in cg.branches.values())  # conv, bn, relu, conv, bn
    assert not group_of_producer(cg, "fc").prunable


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        y = torch.roll(self.a(x), 1, dims=1)  # mixes channel positions: not understood
        return self.fc(self.b(y).mean((2, 3)))


def test_unknown_op_freezes_its_channels_and_names_the_op():
    cg = analyze(Unknown(), torch.randn(1, 3, 8, 8))
    g = group_of_producer(cg, "a")
    assert not g.prunable and "roll" in g.frozen[0]
    assert group_of_producer(cg, "b").prunable


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(1, 6, 3), nn.Linear(6 * 4 * 4, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc(torch.flatten(F.relu(self.conv(x)), 1))))


def test_flatten_into_linear_expands_channel_indices():
    cg = analyze(FlattenLinear(), torch.randn(2, 1, 6, 6))
    g = group_of_producer(cg, "conv")
    assert g.prunable and g.num_units == 6
    flat = next(r.space for r in cg.reads if r.node == "fc")
    np.testing.assert_array_equal(g.unit_index[flat], np.repeat(np.arange(6), 16))


def test_grouped_conv_ties_same_position_in_every_group():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 12, 3, groups=4), nn.ReLU(), nn.Conv2d(12, 2, 1))
    cg = analyze(model, torch.randn(1, 3, 5, 5))
    g_in = group_of_producer(cg, "0")
    assert g_in.num_units == 2  # 8 channels in 4 groups of 2
    assert group_of_producer(cg, "1").num_units == 3


def test_depthwise_multiplier_ties_input_to_its_outputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1))
    cg = analyze(model, torch.randn(1, 3, 5, 5))
    g = group_of_producer(cg, "0")
    assert g.num_units == 4
    out_space = next(b.space for b in cg.bindings if b.owner == "2" and b.role == "consumer")
    np.testing.assert_array_equal(g.unit_index[out_space], np.repeat(np.arange(4), 2))


def test_layernorm_over_the_last_dim_is_a_norm_read_and_over_two_dims_is_frozen_with_reason():
    class M(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.fc1, self.ln, self.fc2 = nn.Linear(4, 8), nn.LayerNorm(shape), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(self.ln(self.fc1(x)))

    cg = analyze(M(8), torch.randn(2, 3, 4))
    g = group_of_producer(cg, "fc1")
    assert g.prunable
    assert [r.kind for r in cg.reads if r.node == "ln"] == ["norm"]
    assert {b.param for b in cg.bindings if b.owner == "ln"} == {"ln.weight", "ln.bias"}
    cg = analyze(M((3, 8)), torch.randn(2, 3, 4))
    g = group_of_producer(cg, "fc1")
    assert not g.prunable and "LayerNorm normalises over 2 dims" in g.frozen[0]


def test_multihead_attention_it_cannot_write_out_is_frozen_not_guessed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.mem = nn.Linear(4, 8), nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            t, m = self.fc(x), self.mem(x)
            return self.attn(t, m, m)[0]  # cross-attention: key and value are not the query

    cg = analyze(M(), torch.randn(2, 3, 4))
    assert "MultiheadAttention" in group_of_producer(cg, "fc").frozen[0]


def test_shared_module_ties_both_uses():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.shared = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.shared(self.a(x)) + self.shared(self.b(x))

    cg = analyze(M(), torch.randn(1, 3, 4, 4))
    assert group_of_producer(cg, "a") is group_of_producer(cg, "b")


def test_cat_gives_each_input_its_own_units():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1))

    cg = analyze(M(), torch.randn(1, 3, 4, 4))
    g = group_of_producer(cg, "a")
    assert g is group_of_producer(cg, "b") and g.num_units == 10


def test_size_of_channel_dim_used_in_arithmetic_freezes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) * (y.size(1) / 4)

    cg = analyze(M(), torch.randn(1, 3, 4, 4))
    assert "size of channel dim" in group_of_producer(cg, "a").frozen[0]


class _LayerScale(nn.Module):
    """ConvNeXt-style layer scale read directly and reshaped, and a ViT-style class token
    expanded over the batch and concatenated with the tokens."""

    def __init__(self):
        super().__init__()
        self.conv, self.gamma = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.rand(8) + 0.5)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.fc, self.head = nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        y = self.conv(x) * self.gamma.reshape(1, -1, 1, 1)
        t = y.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        return self.head(self.fc(t)[:, 0])


def test_a_parameter_reshaped_or_expanded_carries_the_channels_it_is_indexed_by():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    gated = fxprune.prepare(_LayerScale(), (x,))
    cg = fxprune.channel_graph(gated)
    g = group_of_producer(cg, "conv")
    assert g.prunable, g.frozen
    assert {b.param for b in cg.bindings if cg.spaces[b.space].group == g.id} >= {"gamma", "cls", "conv.weight"}
    compact = fxprune.convert(random_masks(gated, keep=0.5, seed=1).eval())
    assert compact.gamma.shape == (4,) and compact.cls.shape == (1, 1, 4)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-5, atol=1e-6)


def test_channels_inside_a_submodule_kept_whole_are_counted_among_the_frozen_with_its_reason():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 16)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # control flow on a tensor value

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = Untraceable(), nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.inner(x))

    cg = analyze(M(), torch.randn(2, 4))
    reasons = cg.frozen_reasons()
    assert sum(reasons.values()) == cg.prunable_share()[1] - cg.prunable_share()[0] == 18
    assert any("'inner'" in why and n == 16 for why, n in reasons.items()), reasons


class PadTokens(nn.Module):
    """Swin's window padding: ``F.pad`` of H and W of a ``[B, H, W, C]`` tensor, C untouched;
    ``channel=True`` pads C instead."""

    def __init__(self, channel: bool) -> None:
        super().__init__()
        self.channel = channel
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8 + 2 * channel, 3)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.pad(y, (1, 1) if self.channel else (0, 0, 0, 1, 0, 1))
        return self.b(y).mean((1, 2))


def test_a_pad_that_leaves_the_channel_dim_alone_keeps_it_prunable():
    x = torch.randn(2, 3, 3, 4)
    gated = fxprune.prepare(PadTokens(channel=False), (x,))
    cg = fxprune.channel_graph(gated)
    assert cg.prunable_share()[0] == 8
    random_masks(gated, keep=0.5, seed=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(fxprune.convert(gated).eval()(x), gated(x))
    frozen = fxprune.channel_graph(fxprune.prepare(PadTokens(channel=True), (x,)))
    assert frozen.prunable_share()[0] == 0
    assert any("pads channel dim 3" in r for r in frozen.frozen_reasons())


class WindowBias(nn.Module):
    """Swin's pieces: a window shift (``torch.roll`` over H and W), a per-head bias read from
    a table with a tensor index, added to attention scores, and a crop with computed bounds."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(8, 3 * 8), nn.Linear(8, 8)
        self.table = nn.Parameter(torch.randn(7, heads))
        self.register_buffer("index", torch.randint(0, 7, (9,)))

    def forward(self, x):  # x: [B, 3, 3, 8]
        B, H, W, C = x.shape
        x = torch.roll(x, shifts=(1, 1), dims=(1, 2))
        t = x.reshape(B, H * W, C)
        q, k, v = self.qkv(t).reshape(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].view(3, 3, -1).permute(2, 0, 1)  # [heads, 3, 3]
        attn = (q @ k.transpose(-2, -1)).view(B, self.heads, 3, 3, 9)[:, :, :, :, :H * W] + bias.unsqueeze(-1)
        y = attn.view(B, self.heads, 9, 9).softmax(-1) @ v
        y = self.proj(y.transpose(1, 2).reshape(B, H * W, 8))
        return y.view(B, H, W, C)[:, : H - 1].mean((1, 2))


def test_roll_tensor_index_and_computed_crops_keep_heads_and_channels_prunable():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 8)
    gated = fxprune.prepare(WindowBias(), (x,))
    cg = fxprune.channel_graph(gated)
    heads = [g for g in cg.prunable_groups if g.num_units == 4]
    assert heads, cg.frozen_reasons()
    random_masks(gated, keep=0.5, seed=0).eval()
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-5, atol=1e-6)
    assert compact.table.shape[1] < 4, "the bias table lost the removed heads' columns"


def test_rolling_or_gathering_the_channel_dim_freezes_it():
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
            self.register_buffer("perm", torch.randperm(8))

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.roll(h, 1, dims=-1)) + self.b(h[:, self.perm])

    cg = fxprune.channel_graph(fxprune.prepare(Bad(), (torch.randn(2, 4),)))
    assert cg.prunable_share()[0] == 0
    reasons = " ".join(cg.frozen_reasons())
    assert "rolls channel dim 1" in reasons or "gathers along channel dim 1" in reasons


class SliceWrite(nn.Module):
    """A tensor written into a slice (MViTv2's relative position terms): the write reaches
    the output through the tensor written into, with no edge from the write node."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.table = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = self.a(x)
        h[:, :3] = h[:, :3] + self.table
        return self.b(h)


def test_parameters_read_only_by_a_write_into_a_tensor_count_as_used():
    gated = fxprune.prepare(SliceWrite(), (torch.randn(2, 4),))
    cg = fxprune.channel_graph(gated)
    assert cg.params["table"].used
    from fxprune.testing import implied_param_count

    assert implied_param_count(gated) == sum(p.numel() for p in fxprune.convert(gated).parameters())


class MatmulWithTable(nn.Module):
    """``h @ W`` with ``W`` a parameter: the contraction carries ``h``'s channels."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.table = nn.Parameter(torch.randn(8, 6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)) @ self.table)


def test_a_matmul_contracting_prunable_channels_reads_their_gates():
    """A removed channel of ``h`` must add nothing to ``h @ W``: the gated model reads the
    gates at the contraction, as a linear layer's input does (it did not: compact != gated)."""
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    gated = fxprune.prepare(MatmulWithTable(), (x,), fxprune.PruneConfig("units"))
    g = group_of_producer(fxprune.channel_graph(gated), "inp")
    assert g.prunable and g.num_units == 8
    compact = fxprune.convert(random_masks(gated, keep=0.5, seed=0).eval())
    assert compact.get_parameter("table").shape[0] < 8
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)


class ZeroedBias(nn.Module):
    """Swin V2's q/k/v bias: a copy of the bias with its k part zeroed in place, given to
    ``F.linear``; and a per-head scale computed from a parameter (``clamp(...).exp()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.weight, self.bias = nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6))
        self.scale = nn.Parameter(torch.randn(6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        bias = self.bias.clone()
        bias[2:4].zero_()
        h = F.linear(torch.relu(self.inp(x)), self.weight, bias)
        return self.out(torch.relu(h) * self.scale.clamp(max=1.0).exp())


def test_a_bias_computed_in_place_from_a_parameter_is_sliced_with_it():
    """The computed bias and the computed scale carry the linear's output channels (they
    froze them: 'computed weights'), and compaction keeps the in-place write that zeroes
    part of the copy (dead-code elimination dropped it: compact != gated)."""
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    gated = fxprune.prepare(ZeroedBias(), (x,), fxprune.PruneConfig("units"))
    cg = fxprune.channel_graph(gated)
    g = next(cg.group_of(b.space) for b in cg.bindings if b.param == "weight" and b.dim == 0)
    assert g.prunable and g.num_units == 6, g.frozen
    compact = fxprune.convert(random_masks(gated, keep=0.5, seed=0).eval())
    assert compact.get_parameter("bias").shape[0] == 3 and "zero_" in compact.code
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
