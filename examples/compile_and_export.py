"""Prune a torchvision ResNet-18 with a fixed random channel pattern, then check, save,
compile and export the compact model.

    python examples/compile_and_export.py [--keep 0.5] [--out out/resnet18_pruned]
"""

import argparse

import torch
import torchvision

import fxprune
from fxprune.export import save_compact
from fxprune.report.latency import compile_model, latency_ms
from fxprune.report.tables import summary
from fxprune.testing import random_masks

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--keep", type=float, default=0.5)
p.add_argument("--out", default="out/resnet18_pruned")
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

paths = save_compact(compact, (x,), args.out)         # model.pt2 + a Python package with its state dict
print(f"saved {paths['pt2']} (torch.export.load(...).module()) and {paths['package']} (no fxprune needed)")

compiled = compile_model(compact, x, mode="max-autotune")
dense_ms, compact_ms, compiled_ms = latency_ms(model, x), latency_ms(compact, x), latency_ms(compiled, x)
print(f"latency, batch 8 at 128x128: dense {dense_ms:.1f} ms, compact {compact_ms:.1f} ms, "
      f"compact + torch.compile(max-autotune) {compiled_ms:.1f} ms (dense / compact {dense_ms / compact_ms:.2f}x)")
