"""Prune a torchvision ResNet-18 with a fixed random channel/branch pattern, then check,
compile and export the compact model.

    python examples/compile_and_export.py [--keep 0.5] [--out resnet18_pruned.pt2]
"""

import argparse
import os
import time

import torch
import torchvision

import fxprune
from fxprune.report import summary
from fxprune.testing import random_masks


def latency_ms(fn, x, repeat=10):
    with torch.no_grad():
        fn(x)
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn(x)
    return (time.perf_counter() - t0) / repeat * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--out", default="resnet18_pruned.pt2")
    args = p.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(8, 3, 128, 128)

    gated = fxprune.prepare(model, (x,))                  # trace + analyze + insert gates
    print(summary(fxprune.channel_graph(gated)))
    random_masks(gated, keep=args.keep, seed=0).eval()    # stand-in for training the gates
    compact = fxprune.convert(gated).eval()               # plain, physically smaller GraphModule

    with torch.no_grad():
        err = ((compact(x) - gated(x)).abs().max() / gated(x).abs().max()).item()
    params = [sum(p.numel() for p in m.parameters()) for m in (model, compact)]
    print(f"parameters {params[0] / 1e6:.2f}M -> {params[1] / 1e6:.2f}M; max relative difference to gated model {err:.1e}")

    ep = torch.export.export(compact, (x,))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.export.save(ep, args.out)
    print(f"exported to {args.out} (load with torch.export.load, no fxprune needed)")

    compiled = torch.compile(compact)
    dense_ms, compact_ms, compiled_ms = latency_ms(model, x), latency_ms(compact, x), latency_ms(compiled, x)
    print(f"CPU latency, batch 8 at 128x128: dense {dense_ms:.1f} ms, compact {compact_ms:.1f} ms, "
          f"compact+torch.compile {compiled_ms:.1f} ms (dense/compact {dense_ms / compact_ms:.2f}x)")


if __name__ == "__main__":
    main()
