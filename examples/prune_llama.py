"""Prune a tiny Llama while it learns real text, and give back a stock Hugging Face checkpoint.

Usage: python examples/prune_llama.py [--steps 600] [--out pruned-llama]

A byte-level ``LlamaForCausalLM`` (4 layers, width 128, 16 heads of 8 dims, 4 key/value
heads) learns the Python standard library's source as bytes, once dense and once with
``PruneConfig(target_flops=0.5, uniform=True, multiple_of=8, total_steps=...,
structures="units")``: every layer keeps the same widths (heads, key/value heads, MLP
units; the residual width is one), each a multiple of 8 or whole, so a stock
``LlamaConfig`` describes the pruned model (a block's attention or MLP removed alone, which
``structures="both"`` can do, it could not). ``fxprune.hf.to_pretrained`` gives that model, ``save_pretrained`` writes it,
``AutoModelForCausalLM.from_pretrained`` reads it back, and the reloaded model's logits are
compared with the compact model's. Prints the held-out loss (bits per byte) of both runs.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sysconfig
import time
import warnings

import torch
import transformers as tf

import fxprune
import fxprune.hf

CONTEXT, BATCH = 128, 16


def text() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 60 modules of the standard library as bytes: 90 % to train on, 10 % held out."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:60]
    data = torch.tensor(list(b"".join(open(f, "rb").read() for f in files)), dtype=torch.long)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def windows(data: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - CONTEXT, (BATCH,), generator=g)
    return torch.stack([data[s:s + CONTEXT] for s in starts])


def llama() -> tf.LlamaForCausalLM:
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=CONTEXT))


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, held_out: torch.Tensor) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1)
    losses = [model(input_ids=(x := windows(held_out, g)), labels=x).loss.item() for _ in range(20)]
    model.train()
    return sum(losses) / len(losses) / math.log(2)


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, config: fxprune.PruneConfig | None = None):
    """``steps`` of AdamW (1e-3, a tenth of warm-up, cosine); pruning while training when ``config`` is given."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if config is not None:
        x = windows(data, g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' notes on a random config
            model = fxprune.prepare(model, (x,), config, kwargs={"labels": x})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0 if config else 0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    pruner = fxprune.Pruner(model, opt) if config is not None else None
    model.train()
    for _ in range(steps):
        x = windows(data, g)
        loss = model(input_ids=x, labels=x).loss + (pruner.penalty() if pruner else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if pruner:
            pruner.step()
    return model, pruner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage=__doc__.splitlines()[2][len("Usage: "):])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default="pruned-llama", help="folder save_pretrained writes the pruned model to")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_text, held_out = text()

    t0 = time.process_time()
    dense, _ = train(llama(), train_text, args.steps)
    dense_seconds = time.process_time() - t0
    dense_bpb = bits_per_byte(dense, held_out)

    config = fxprune.PruneConfig(target_flops=0.5, uniform=True, multiple_of=8, total_steps=args.steps,
                                 structures="units")
    t0 = time.process_time()
    gated, pruner = train(llama(), train_text, args.steps, config)
    pruned_seconds = time.process_time() - t0

    stock = fxprune.hf.to_pretrained(gated)
    stock.save_pretrained(args.out)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(args.out).eval()
    compact = fxprune.convert(gated).eval()
    x = windows(held_out, torch.Generator().manual_seed(2))
    with torch.no_grad():
        gap = (reloaded(input_ids=x).logits - compact(input_ids=x, labels=x).logits).abs().max().item()
    pruned_bpb = bits_per_byte(reloaded, held_out)

    cfg = stock.config
    print(f"dense:  {dense_bpb:.3f} bits/byte held out")
    print(f"pruned: {pruned_bpb:.3f} bits/byte held out ({100 * (pruned_bpb / dense_bpb - 1):+.1f} %), "
          f"FLOPs {pruner.report()['flops']:.3f} of dense, training FLOPs {pruner.training_flops_ratio():.2f}, "
          f"CPU time {pruned_seconds / dense_seconds:.2f} of dense")
    print(f"stock config: hidden_size {cfg.hidden_size}, num_attention_heads {cfg.num_attention_heads}, "
          f"num_key_value_heads {cfg.num_key_value_heads}, head_dim {cfg.head_dim}, intermediate_size "
          f"{cfg.intermediate_size}, num_hidden_layers {cfg.num_hidden_layers} (dense: 128, 16, 4, 8, 344, 4)")
    print(f"saved to {args.out}/; reloaded with AutoModelForCausalLM.from_pretrained: logits within {gap:.1e} "
          "of the compact model's")


if __name__ == "__main__":
    main()
