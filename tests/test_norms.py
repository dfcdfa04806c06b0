"""LayerNorm and RMSNorm over a prunable channel group: the gated model's norm counts only
the channels whose gate is on, so the residual stream of a transformer is prunable and the
compact model (the plain norm over the kept width) equals the gated one."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_loop import train_steps

import fxprune
from fxprune.gates import GateNorm
from fxprune.state import UnitGate, gate_bank, state_of, theta_of
from fxprune.testing import implied_param_count, random_masks


class FunctionalNorm(nn.Module):
    """A norm written with ``F.layer_norm`` / ``F.rms_norm`` (as timm's norm layers are)."""

    def __init__(self, c: int, rms: bool) -> None:
        super().__init__()
        self.rms = rms
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = None if rms else nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


class HandRMSNorm(nn.Module):
    """RMSNorm written out, as transformers' Llama, Mistral and Qwen write it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


def make_norm(kind: str, c: int) -> nn.Module:
    return {
        "hand_rms": lambda: HandRMSNorm(c),
        "layer": lambda: nn.LayerNorm(c),
        "layer_noaffine": lambda: nn.LayerNorm(c, elementwise_affine=False),
        "rms": lambda: nn.RMSNorm(c),
        "f_layer": lambda: FunctionalNorm(c, rms=False),
        "f_rms": lambda: FunctionalNorm(c, rms=True),
    }[kind]()


NORMS = ["layer", "layer_noaffine", "rms", "f_layer", "f_rms", "hand_rms"]


class Block(nn.Module):
    def __init__(self, c: int, hidden: int, norm: str, post: bool) -> None:
        super().__init__()
        self.norm, self.post = make_norm(norm, c), post
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        if self.post:
            return self.norm(x + self.fc2(F.gelu(self.fc1(x))))
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TokenNet(nn.Module):
    """[batch, tokens, features] -> embed -> blocks -> norm -> mean over tokens -> head."""

    def __init__(self, norm: str = "layer", post: bool = False, d: int = 5, c: int = 12, hidden: int = 16,
                 depth: int = 2, out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d, c)
        self.blocks = nn.Sequential(*[Block(c, hidden, norm, post) for _ in range(depth)])
        self.norm, self.head = make_norm(norm, c), nn.Linear(c, out)
        with torch.no_grad():  # affine tensors away from 1 and 0, so a wrong slice shows
            for m in self.modules():
                if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    if getattr(m, "bias", None) is not None:
                        m.bias.normal_(0, 0.1)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def stream_group(gated):
    """The group of the embedding's output channels (the residual stream)."""
    cg = state_of(gated).graph
    return next(cg.group_of(b.space) for b in cg.bindings if b.param == "embed.weight" and b.dim == 0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("post", [False, True], ids=["pre-norm", "post-norm"])
def test_residual_stream_normalised_by_a_norm_is_prunable(norm, post):
    x = torch.randn(4, 7, 5)
    gated = fxprune.prepare(TokenNet(norm, post), (x,))
    group = stream_group(gated)
    assert group.prunable, group.frozen
    assert group.id in state_of(gated).layout.units
    prunable, total = state_of(gated).graph.prunable_share()
    assert prunable == total - 3  # everything but the head's 3 logits


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("post", [False, True], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75])
def test_compact_model_with_the_plain_norm_equals_the_gated_one(norm, post, keep):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 5)
    gated = random_masks(fxprune.prepare(TokenNet(norm, post), (x,)), keep=keep, seed=3).eval()
    kept = int(theta_of(gated, UnitGate(stream_group(gated).id)).ge(0.5).sum())
    assert 0 < kept < 12
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)
    norms = [m for m in compact.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert all(m.normalized_shape == (kept,) for m in norms)
    assert not any(isinstance(m, GateNorm) for m in compact.modules())
    torch.export.export(compact, (x,))


def test_masking_matters_the_plain_norm_over_the_gated_width_would_differ():
    """The gated model's norm is not the plain norm applied to gated inputs."""
    torch.manual_seed(0)
    x = torch.randn(4, 7, 5)
    gated = random_masks(fxprune.prepare(TokenNet("layer"), (x,)), keep=0.5, seed=3).eval()
    norm = next(m for m in gated.modules() if isinstance(m, GateNorm))
    h = torch.randn(4, 7, 12)
    mask = torch.zeros(norm.index.max() + 1)
    mask[norm.index[:6]] = 1
    masked = norm(h, mask)
    plain = F.layer_norm(h * norm.channel_mask(h, mask), (12,))
    assert not torch.allclose(masked[..., :6], plain[..., :6], atol=1e-3)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_per_example_masks_give_each_example_the_norm_over_its_own_kept_channels(kind):
    torch.manual_seed(0)
    c, batch = 10, 6
    norm = GateNorm(np.arange(c), dim=2, batch_dim=0, group=0, space=0, kind=kind, eps=1e-5)
    x, w, b = torch.randn(batch, 3, c), torch.rand(c) + 0.5, torch.randn(c)
    mask = (torch.rand(batch, c) < 0.5).float()
    mask[0] = 0  # an example with every channel off gets zeros, not NaN
    y = norm(x, mask, w, b if kind == "layer" else None)
    assert torch.isfinite(y).all()
    for i in range(1, batch):
        k = mask[i].bool()
        if kind == "layer":
            ref = F.layer_norm(x[i][:, k], (int(k.sum()),), w[k], b[k], 1e-5)
        else:
            ref = F.rms_norm(x[i][:, k], (int(k.sum()),), w[k], 1e-5)
        torch.testing.assert_close(y[i][:, k], ref, rtol=1e-5, atol=1e-5)
    assert (y[0] == (0 if kind == "rms" else b)).all()


def test_gated_norm_gradient_reaches_the_stream_thetas():
    torch.manual_seed(0)
    x = torch.randn(8, 7, 5)
    gated = fxprune.prepare(TokenNet("rms"), (x,), fxprune.PruneConfig(gamma=1.0)).train()
    bank = gate_bank(gated)
    bank.theta.requires_grad_(True)
    gated(x).square().mean().backward()
    grad = bank.theta.grad[state_of(gated).layout.units[stream_group(gated).id]]
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["layer", "f_rms"])
def test_transformer_stream_trains_through_live_removals_and_converts(norm):
    torch.manual_seed(0)
    x, y = torch.randn(32, 7, 5), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(TokenNet(norm), (x,), fxprune.PruneConfig("units", gamma=1.0, check_every=10**6))
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(gated, opt)
    gid = stream_group(gated).id
    for step in range(6):
        train_steps(gated, opt, pruner, [(x, y)])
        if step in (1, 3):  # switch off two channels of the stream and remove them
            theta = theta_of(gated, UnitGate(gid))
            with torch.no_grad():
                theta[:2] = 0.0
            drop = np.zeros(theta.numel(), dtype=bool)
            drop[:2] = True
            pruner.remove({gid: drop}, set())
    assert theta_of(gated, UnitGate(gid)).numel() == 12 - 4
    assert gated.embed.weight.shape[0] == 8
    compact = fxprune.convert(gated.eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
    assert all(m.normalized_shape == (8,) for m in compact.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)))


class ConvGroupNorm(nn.Module):
    def __init__(self, functional: bool = False, affine: bool = True) -> None:
        super().__init__()
        self.functional = functional
        self.conv1, self.conv2 = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 4, 1)
        self.gn = nn.GroupNorm(3, 12, affine=affine)
        if affine:
            with torch.no_grad():
                self.gn.weight.uniform_(0.5, 1.5)
                self.gn.bias.normal_(0, 0.3)

    def forward(self, x):
        h = self.conv1(x)
        h = F.group_norm(h, 3, self.gn.weight, self.gn.bias, 1e-5) if self.functional else self.gn(h)
        return self.conv2(F.silu(h)).mean((2, 3))


@pytest.mark.parametrize("functional,affine", [(False, True), (True, True), (False, False)])
def test_group_norm_prunes_the_same_position_in_every_group_and_compacts_exactly(functional, affine):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 5, 5)
    gated = fxprune.prepare(ConvGroupNorm(functional, affine), (x,))
    cg = state_of(gated).graph
    g = next(cg.group_of(b.space) for b in cg.bindings if b.param == "conv1.weight" and b.dim == 0)
    assert g.prunable and g.num_units == 4, g.frozen  # 12 channels in 3 groups: 4 positions
    random_masks(gated, keep=0.5, seed=1).eval()
    compact = fxprune.convert(gated).eval()
    assert compact.conv1.out_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)


def test_group_norm_per_example_masks_give_each_example_its_own_kept_channels():
    torch.manual_seed(0)
    c, groups, batch = 8, 2, 4
    norm = GateNorm(np.tile(np.arange(4), 2), dim=1, batch_dim=0, group=0, space=0, kind="group", eps=1e-5,
                    groups=groups)
    x, w, b = torch.randn(batch, c, 3, 3), torch.rand(c) + 0.5, torch.randn(c)
    mask = (torch.rand(batch, 4) < 0.6).float()
    mask[:, 0] = 1
    y = norm(x, mask, w, b)
    for i in range(batch):
        k = mask[i].bool().repeat(2)
        ref = F.group_norm(x[i:i + 1, k], groups, w[k], b[k], 1e-5)
        torch.testing.assert_close(y[i:i + 1, k], ref, rtol=1e-5, atol=1e-5)


class SumOfSquares(nn.Module):
    """Looks like RMSNorm but divides by the root of the sum, not the mean: not a norm of
    the kept channels alone, so it must not be read as one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + 1e-6))


def test_a_pattern_that_is_not_exactly_rmsnorm_is_left_alone_and_freezes():
    x = torch.randn(4, 5)
    gated = fxprune.prepare(SumOfSquares(), (x,))
    assert not any(n.target is F.rms_norm for n in gated.graph.nodes)
    cg = state_of(gated).graph
    assert cg.prunable_share()[0] == 0
    assert any("reduces over channel dim" in r for r in cg.frozen_reasons())
