"""Prune a small transformer while training it: the digits as sequences of 8 rows of 8 pixels.

    python examples/prune_transformer.py [--epochs 40] [--target-flops 0.5]

Whole attention heads (their q, k and v rows and the output projection's columns), head_dim
entries (the same entry of every head), the residual stream (read through LayerNorm, whose statistics then count only the kept
channels) and the MLP units are gated, removed from the live model as their gates switch
off, and the compact model is checked against the gated one.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.digits.data import digits_loaders
from fxprune.digits.training import accuracy


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RowTransformer(nn.Module):
    """[B, 1, 8, 8] digits -> 8 row tokens -> 2 pre-norm blocks -> mean -> 10 classes."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.embed, self.pos = nn.Linear(8, dim), nn.Parameter(torch.randn(1, 8, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.flatten(1, 2)) + self.pos
        return self.head(self.norm(self.blocks(t)).mean(1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--target-flops", type=float, default=0.5, help="the budget: a fraction of the dense model's FLOPs")
    args = p.parse_args()

    torch.manual_seed(0)
    train, test = digits_loaders(batch_size=64, seed=0)
    model = RowTransformer()
    config = fxprune.PruneConfig(target_flops=args.target_flops, total_steps=args.epochs * len(train))
    gated = fxprune.prepare(model, next(iter(train))[0], config)
    optimizer = torch.optim.AdamW(gated.parameters(), lr=2e-3, weight_decay=0.0)  # the pruner holds the decay
    pruner = fxprune.Pruner(gated, optimizer)

    def width(layer: str) -> int:
        try:
            return gated.get_submodule(layer).out_features
        except AttributeError:  # its residual branch was removed whole
            return 0

    def widths() -> str:
        graph = fxprune.channel_graph(gated)  # the analysis of the live model, after every removal
        heads = [graph.head_shape(f"blocks.{i}.attn.qkv") for i in range(2)]
        attention = ", ".join("removed" if h is None else f"{h[0]}x{h[1]}" for h in heads)
        mlp = [width(f"blocks.{i}.mlp.0") for i in range(2)]
        return f"stream {gated.embed.out_features}, heads x head_dim [{attention}], MLP units {mlp}"

    print(f"start: {widths()}")
    for epoch in range(args.epochs):
        for x, y in train:
            loss = F.cross_entropy(gated(x), y) + pruner.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pruner.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1}: {widths()}, test accuracy {accuracy(gated, test):.1f}%")

    compact = fxprune.convert(gated.eval())
    x = next(iter(test))[0]
    with torch.no_grad():
        err = (compact(x) - gated(x)).abs().max().item()
    print(f"compact model: {sum(q.numel() for q in compact.parameters()):,} parameters "
          f"({sum(q.numel() for q in model.parameters()):,} dense), test accuracy {accuracy(compact, test):.1f}%, "
          f"max difference from the gated model {err:.1e}; training FLOPs ratio {pruner.training_flops_ratio():.2f}")
