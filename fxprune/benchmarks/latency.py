"""``fxprune bench latency``: is the compact model as much faster as its FLOPs say?

A torchvision model gets random unit masks keeping ``--keep`` of every channel group
(layer gates kept), is converted, and the dense and compact models are timed side by
side, eager and under ``torch.compile``. It prints the latency ratio dense / compact
against the FLOPs ratio; the goal is a latency ratio of at least 0.8 of the FLOPs ratio.
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from ..api import convert, prepare
from ..cost import forward_flops
from ..report.latency import compile_model, latency_ms
from ..state import set_decisions, state_of
from ..testing import random_masks
from ..testing.models import device_of, load_model

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxprune bench latency", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["latency"])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="image side (default 224)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept per group (default 0.5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", default="max-autotune", help="torch.compile mode (default max-autotune); 'none' skips compiling")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    device = device_of(args.device)
    torch.manual_seed(0)
    model = load_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    gated = prepare(model, (x[:2],), mode="eval")
    random_masks(gated, keep=args.keep, seed=0)
    set_decisions(gated, {}, dict.fromkeys(state_of(gated).layout.layers, True))
    compact = convert(gated.eval()).eval()
    flops_ratio = forward_flops(model, (x[:1],)) / forward_flops(compact, (x[:1],))
    model, compact, x = model.to(device), compact.to(device), x.to(device)
    with torch.inference_mode():
        torch.testing.assert_close(compact(x[:2]), gated.to(device)(x[:2]), rtol=1e-3, atol=1e-3)
    del gated
    rows = []
    timings = {"eager": (latency_ms(model, x, args.iters), latency_ms(compact, x, args.iters))}
    if args.mode != "none":
        mode = None if args.mode == "default" else args.mode
        timings[f"compile {args.mode}"] = (latency_ms(compile_model(model, x, mode), x, args.iters),
                                           latency_ms(compile_model(compact, x, mode), x, args.iters))
    for name, (d, c) in timings.items():
        rows.append([name, f"{d:.2f}", f"{c:.2f}", f"{d / c:.2f}", f"{flops_ratio:.2f}", f"{d / c / flops_ratio:.2f}"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, keep {args.keep:g} of every channel group; "
          f"{where}; torch {torch.__version__}")
    print(tabulate(rows, headers=["", "dense ms", "compact ms", "latency ratio", "FLOPs ratio", "latency / FLOPs ratio"],
                   tablefmt="github"))
    return 0
