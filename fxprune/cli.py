"""The ``fxprune`` command line: ``inspect``, ``zoo``, ``bench``."""

from __future__ import annotations

import argparse
import sys

import torch

from .passes import TraceError
from .testing.models import load_model

__all__ = ["main"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like 1,3,224,224, got '{text}'") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got '{text}'")
    return dims


def cmd_inspect(args: argparse.Namespace) -> int:
    from .api import pick_front_end
    from .passes import analyze, front_end_of, trace
    from .report.gate_graph import gate_graph, picture_path, write_gate_graph
    from .report.tables import branches_table, groups_table, summary

    if args.graph:
        picture_path(args.graph)  # fail before the work
    model = load_model(args.model).eval()
    x = (torch.randn(*args.input_shape),)
    gm = trace(model, x, front_end=args.front_end)
    cg = analyze(gm)
    if args.front_end == "auto":  # as prepare chooses
        gm, cg = pick_front_end(model, gm, cg, x, 0, "eval")
    front, why = front_end_of(gm)
    print(f"{args.model}: input {tuple(args.input_shape)}; traced by {front}" + (f" ({why})" if why else ""))
    print(summary(cg))
    print()
    print(groups_table(cg))
    print()
    print(branches_table(cg) if cg.branches else "no residual branches")
    if args.graph:
        path = write_gate_graph(gate_graph(cg), args.graph, f"{args.model}: channel groups and layer gates")
        print(f"\ngate placement drawn to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .digits import demo

    return demo.run(args)


def cmd_zoo(args: argparse.Namespace) -> int:
    from .testing import zoo

    return zoo.main(args.rest)


BENCHES = {
    "analyze": "trace+analyze against Torch-Pruning",
    "defaults": "PruneConfig() and FLOPs budgets on five tasks and three optimizers",
    "digits": "pruning while training against dense and magnitude pruning",
    "latency": "dense vs compact latency against the FLOPs ratio",
    "real": "PruneConfig(total_steps) on torchvision and transformers models against dense, Torch-Pruning, from scratch",
    "step": "a training step with gates against without",
    "tradeoff": "what gamma, beta and alpha do, and unit/layer/combined gates",
    "zoo": "the zoo check side by side with Torch-Pruning on the same models (timm by default)",
}


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    asked = args.what in ("-h", "--help") or (args.what is None and {"-h", "--help"} & set(args.rest))
    if args.what is None or asked:
        print("usage: fxprune bench {" + ",".join(BENCHES) + "} [options]   (fxprune bench NAME --help for its options)\n")
        print("\n".join(f"  {k:<9} {v}" for k, v in BENCHES.items()))
        return 0 if asked else 2
    if args.what not in BENCHES:
        raise ValueError(f"unknown benchmark '{args.what}': choose one of {', '.join(BENCHES)}")
    bench = importlib.import_module(f".benchmarks.{args.what}", __package__)
    return bench.main([args.what, *args.rest])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description="Train and prune PyTorch networks with torch.fx passes.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="print a model's channel groups and residual branches")
    i.add_argument("model", help="torchvision model name, or package.module:factory")
    i.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), help="example input shape (default 1,3,224,224)")
    i.add_argument("--graph", metavar="FILE", help="draw the gate placement to FILE (.png, .svg, .pdf or graphviz .dot)")
    i.add_argument("--front-end", choices=["auto", "symbolic", "export"], default="auto",
                   help="auto (default): as prepare chooses; or only torch.fx symbolic tracing, or only torch.export")
    i.set_defaults(func=cmd_inspect, passes_rest=False)
    from .digits.demo import add_arguments as demo_arguments

    d = sub.add_parser("demo", help="train and prune a ResNet on the digits data: table, compact model, picture, latency")
    demo_arguments(d)
    d.set_defaults(func=cmd_demo, passes_rest=False)
    # zoo and bench parse their own options (``fxprune zoo --help``): the rest is handed on
    z = sub.add_parser("zoo", help="prune every torchvision classifier (or timm's families: --source timm) at random and check equivalence", add_help=False)
    z.set_defaults(func=cmd_zoo, passes_rest=True)
    b = sub.add_parser("bench", add_help=False,
                       help="benchmarks: " + "; ".join(f"'{k}' ({v})" for k, v in BENCHES.items()))
    b.add_argument("what", nargs="?", help="which benchmark: " + ", ".join(BENCHES))
    b.set_defaults(func=cmd_bench, passes_rest=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not args.passes_rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.func(args)
    except (ValueError, OSError, TypeError, TraceError) as exc:  # bad input, unwritable paths, a missing device
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
