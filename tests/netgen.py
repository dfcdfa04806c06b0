"""A grammar of random networks for the property tests.

``networks()`` is a hypothesis strategy returning ``(model, example_input)``: a conv trunk of
random blocks (conv/BN/act, depthwise, grouped, residual, projection shortcut, SE,
cat/split/chunk, channel slices, functional convs with their own parameters, group norm,
transposed conv, a shape read used to reshape the same or another tensor, literal channel
counts in expand/unflatten, tied weights), then one of several heads (flatten into Linear with literal view sizes,
global pooling, transformer blocks over tokens (pre- or post-norm, LayerNorm or RMSNorm as
modules or functions, MLP, attention: nn.MultiheadAttention, or heads viewed out of packed
or separate projections, grouped-query k/v repeated, into scaled_dot_product_attention), Linear on the last dim of a 4-D tensor via permute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

H = W = 6


def conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, body: nn.Module, proj: nn.Module | None = None) -> None:
        super().__init__()
        self.body, self.proj = body, proj

    def forward(self, x):
        return (x if self.proj is None else self.proj(x)) + self.body(x)


class SE(nn.Module):
    def __init__(self, c: int, r: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        self.fc1 = nn.Linear(c, r) if linear else nn.Conv2d(c, r, 1)
        self.fc2 = nn.Linear(r, c) if linear else nn.Conv2d(r, c, 1)

    def forward(self, x):
        if self.linear:
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
            return x * s[:, :, None, None]
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


class SplitCat(nn.Module):
    """Split channels, transform one part, concatenate back (chunk or split)."""

    def __init__(self, c: int, first: int, chunk: bool) -> None:
        super().__init__()
        self.chunk, self.first = chunk, (c // 2 if chunk else first)
        self.conv = conv_bn(self.first, self.first)

    def forward(self, x):
        a, b = x.chunk(2, dim=1) if self.chunk else torch.split(x, [self.first, x.shape[1] - self.first], dim=1)
        return torch.cat([self.conv(a), b], dim=1)


class Branches(nn.Module):
    def __init__(self, cin: int, c1: int, c2: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(cin, c1, 1), conv_bn(cin, c2, 3)

    def forward(self, x):
        return torch.cat((self.a(x), F.max_pool2d(self.b(x), 3, 1, 1)), 1)


class Slice(nn.Module):
    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x):
        return x[:, self.start:self.stop]


class FunctionalConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) / (3 * cin**0.5))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.gelu(F.conv2d(x, self.weight, self.bias, padding=1))


class ShapeRead(nn.Module):
    """``B, C, H, W = x.shape`` then a reshape with those sizes: of ``x`` itself (safe),
    or of another tensor whose channels are not ``x``'s (timm's nextvit pattern)."""

    def __init__(self, c: int, other: bool) -> None:
        super().__init__()
        self.other, self.conv = other, conv_bn(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        if self.other:
            return self.conv(x).reshape(b, c, h * w).reshape(b, c, h, w)
        return self.conv(x.reshape(b, c, h * w).reshape(b, c, h, w))


class LiteralGate(nn.Module):
    """A squeeze-excitation gate broadcast back with literal channel counts:
    ``expand(-1, C, H, W)`` or ``unflatten(1, (C, 1, 1))``."""

    def __init__(self, c: int, unflatten: bool) -> None:
        super().__init__()
        self.c, self.unflatten = c, unflatten
        self.fc = nn.Linear(c, c)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        s = torch.sigmoid(self.fc(self.pool(x).flatten(1)))
        s = s.unflatten(1, (self.c, 1, 1)) if self.unflatten else s[:, :, None, None].expand(-1, self.c, H, W)
        return x * s


class Tied(nn.Module):
    """Two convolutions sharing one weight tensor, one after the other."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class FlattenHead(nn.Module):
    def __init__(self, c: int, hidden: int, out: int, literal: bool) -> None:
        super().__init__()
        self.literal, self.features = literal, c * H * W
        self.fc1, self.fc2 = nn.Linear(c * H * W, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        x = x.view(-1, self.features) if self.literal else torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class PoolHead(nn.Module):
    def __init__(self, c: int, out: int) -> None:
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, out)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


class FunctionalNorm(nn.Module):
    """A LayerNorm / RMSNorm written with ``F.layer_norm`` / ``F.rms_norm`` and a shape read
    from the input, as timm's norm layers are."""

    def __init__(self, c: int, rms: bool) -> None:
        super().__init__()
        self.rms, self.weight = rms, nn.Parameter(torch.ones(c))
        self.bias = None if rms else nn.Parameter(torch.zeros(c))

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


def make_norm(kind: str, c: int) -> nn.Module:
    return {"layer": lambda: nn.LayerNorm(c), "rms": lambda: nn.RMSNorm(c),
            "f_layer": lambda: FunctionalNorm(c, False), "f_rms": lambda: FunctionalNorm(c, True)}[kind]()


class HeadsAttention(nn.Module):
    """Multi-head attention written out: one packed qkv projection reshaped to
    (3, heads, head_dim) with literal sizes (timm's layout), or q, k, v projections viewed
    with a -1 head dim (language models'), then ``F.scaled_dot_product_attention``, or
    written out as ``softmax(q @ k^T * scale) @ v`` (``explicit``, timm's and Swin's
    non-fused path)."""

    def __init__(self, c: int, packed: bool, grouped: bool = False, explicit: bool = False) -> None:
        super().__init__()
        self.explicit = explicit
        self.heads = 2 if c % 2 == 0 else 1
        self.head_dim, self.packed, self.grouped = c // self.heads, packed, grouped
        kv = self.head_dim if grouped else c  # grouped-query: one k/v head for every query head
        self.qkv = nn.Linear(c, 3 * c) if packed else nn.ModuleList(nn.Linear(c, n) for n in (c, kv, kv))
        self.proj = nn.Linear(c, c)

    def forward(self, t):
        B, N, C = t.shape
        if self.packed:
            q, k, v = self.qkv(t).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(t).view(B, N, -1, self.head_dim).transpose(1, 2) for p in self.qkv)
            if self.grouped:
                k, v = k.repeat_interleave(self.heads, dim=1), v.repeat_interleave(self.heads, dim=1)
        if self.explicit:
            y = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm ``x + mlp(norm(x))`` or post-norm ``norm(x + mlp(x))``, with an optional
    attention sub-block before it, normalised the same way: ``nn.MultiheadAttention``
    ("mha"), or heads written out ("packed", "split")."""

    def __init__(self, c: int, hidden: int, norm: str, post: bool, attention: str | None) -> None:
        super().__init__()
        self.post, self.norm1, self.norm2 = post, make_norm(norm, c), make_norm(norm, c)
        self.kind = attention
        if attention == "mha":
            self.attn = nn.MultiheadAttention(c, 2 if c % 2 == 0 else 1, batch_first=True)
        else:
            self.attn = HeadsAttention(c, attention in ("packed", "matmul"), attention == "gqa",
                                       attention == "matmul") if attention else None
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def _attn(self, t):
        return self.attn(t, t, t, need_weights=False)[0] if self.kind == "mha" else self.attn(t)

    def forward(self, t):
        if self.attn is not None:
            t = self.norm1(t + self._attn(t)) if self.post else t + self._attn(self.norm1(t))
        mlp = lambda u: self.fc2(F.gelu(self.fc1(u)))  # noqa: E731
        return self.norm2(t + mlp(t)) if self.post else t + mlp(self.norm2(t))


class TokenHead(nn.Module):
    """[N, C, H, W] -> tokens [N, L, C] -> (Linear embedding) -> transformer blocks ->
    final norm -> mean over tokens -> Linear."""

    def __init__(self, c: int, hidden: int, out: int, attention: str | None, norm: str = "layer", post: bool = False,
                 depth: int = 1, embed: int | None = None) -> None:
        super().__init__()
        e = embed or c
        self.embed = nn.Linear(c, e) if embed else None
        self.blocks = nn.Sequential(*[TransformerBlock(e, hidden, norm, post, attention) for _ in range(depth)])
        self.norm, self.out = make_norm(norm, e), nn.Linear(e, out)
        for m in self.modules():  # affine tensors away from 1 and 0, so a wrong slice shows
            for name in ("weight", "bias"):
                p = getattr(m, name, None) if isinstance(m, (nn.LayerNorm, nn.RMSNorm, FunctionalNorm)) else None
                if p is not None:
                    p.data.uniform_(0.5, 1.5) if name == "weight" else p.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        if self.embed is not None:
            t = self.embed(t)
        return self.out(self.norm(self.blocks(t)).mean(dim=1))


class LastDimHead(nn.Module):
    """Linear applied on the last dim of a 4-D tensor (channels-last), then back."""

    def __init__(self, c: int, hidden: int, out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        y = self.fc1(x.permute(0, 2, 3, 1)).relu().permute(0, 3, 1, 2)
        return self.fc2(y.mean((2, 3)))


class Net(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Example(tuple):
    """(model, input) with a short repr, so hypothesis reports show the architecture."""

    def __repr__(self) -> str:
        return f"Example(input={tuple(self[1].shape)}, model={self[0]!r})"


@st.composite
def networks(draw) -> tuple[nn.Module, torch.Tensor]:
    widths = st.sampled_from([4, 6, 8, 12])
    c = draw(widths)
    stem = conv_bn(3, c)
    blocks: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(
            ["conv", "depthwise", "grouped", "residual", "projection", "se", "splitcat", "branches", "slice",
             "functional", "groupnorm", "transposed", "shape_self", "shape_other", "expand", "unflatten", "tied"]))
        if kind == "conv":
            cout = draw(widths)
            blocks.append(conv_bn(c, cout, draw(st.sampled_from([1, 3]))))
            c = cout
        elif kind == "depthwise":
            mult = draw(st.sampled_from([1, 2]))
            blocks.append(conv_bn(c, c * mult, 3, groups=c))
            c *= mult
        elif kind == "grouped":
            g = 2
            cout = draw(st.sampled_from([4, 8]))
            blocks.append(conv_bn(c, cout, 3, groups=g))
            c = cout
        elif kind == "residual":
            mid = draw(widths)
            body = nn.Sequential(conv_bn(c, mid), nn.Conv2d(mid, c, 3, padding=1), nn.BatchNorm2d(c))
            blocks.append(Residual(body))
        elif kind == "projection":
            cout = draw(widths)
            blocks.append(Residual(conv_bn(c, cout), nn.Conv2d(c, cout, 1)))
            c = cout
        elif kind == "se":
            blocks.append(SE(c, max(2, c // 2), draw(st.booleans())))
        elif kind == "splitcat":
            blocks.append(SplitCat(c, draw(st.integers(1, c - 1)), draw(st.booleans()) and c % 2 == 0))
        elif kind == "branches":
            c1, c2 = draw(widths), draw(widths)
            blocks.append(Branches(c, c1, c2))
            c = c1 + c2
        elif kind == "slice":
            start = draw(st.integers(0, c // 2))
            stop = draw(st.integers(start + 1, c))
            blocks.append(nn.Sequential(Slice(start, stop), conv_bn(stop - start, c)))
        elif kind == "functional":
            cout = draw(widths)
            blocks.append(FunctionalConv(c, cout))
            c = cout
        elif kind == "groupnorm":
            blocks.append(nn.Sequential(nn.GroupNorm(2 if c % 2 == 0 else 1, c), nn.SiLU()))
        elif kind in ("shape_self", "shape_other"):
            blocks.append(ShapeRead(c, other=kind == "shape_other"))
        elif kind in ("expand", "unflatten"):
            blocks.append(LiteralGate(c, unflatten=kind == "unflatten"))
        elif kind == "tied":
            blocks.append(Tied(c))
        elif kind == "transposed":
            cout = draw(widths)
            blocks.append(nn.Sequential(nn.ConvTranspose2d(c, cout, 3, padding=1), nn.Hardswish()))
            c = cout
    head_kind = draw(st.sampled_from(["flatten", "flatten_literal", "pool", "tokens", "attention", "lastdim"]))
    out = 5
    if head_kind.startswith("flatten"):
        head = FlattenHead(c, draw(widths), out, literal=head_kind == "flatten_literal")
    elif head_kind == "pool":
        head = PoolHead(c, out)
    elif head_kind in ("tokens", "attention"):
        head = TokenHead(c, draw(widths), out,
                         attention=draw(st.sampled_from(["mha", "packed", "split", "gqa", "matmul"])) if head_kind == "attention" else None,
                         norm=draw(st.sampled_from(["layer", "rms", "f_layer", "f_rms"])), post=draw(st.booleans()),
                         depth=draw(st.integers(1, 2)), embed=draw(st.sampled_from([None, 8, 12])))
    else:
        head = LastDimHead(c, draw(widths), out)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Net(stem, blocks, head).eval()
    for m in model.modules():  # non-trivial BN statistics, so slicing them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return Example((model, torch.randn(3, 3, H, W)))
