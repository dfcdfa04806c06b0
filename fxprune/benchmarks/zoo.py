"""``fxprune bench zoo``: fxprune's zoo check side by side with Torch-Pruning on the same
models (the timm sweep by default).

For each model: fxprune as in ``fxprune zoo`` (prepared or not, and when prepared, the
compact model equal to the gated one, the parameter count the masks imply, torch.export);
Torch-Pruning 1.6 (the ``bench`` extra) as a user would run it: ``MagnitudePruner`` at
pruning ratio 0.5 with the classifier ignored, then one forward. Its success is that the
forward runs (its numbers are not checked: it has nothing to compare them with). Each
Torch-Pruning attempt runs in its own process with a time limit, so a hang is reported
as one and the sweep goes on.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import time

from tabulate import tabulate

from ..passes.errors import exception_line
from ..testing.zoo import build_model, check_model, classification_models, timm_models

__all__ = ["torch_pruning_attempt", "main"]


def torch_pruning_attempt(name: str, source: str, ratio: float = 0.5) -> dict:
    """Prune model ``name`` with Torch-Pruning at ``ratio`` and run it once (in this process)."""
    import torch
    import torch_pruning as tp

    from .baseline import _last_called

    model, x = build_model(name, source, 0, 2)
    try:
        head = model.get_submodule(_last_called(model, x))
        before = sum(p.numel() for p in model.parameters())
        tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[head]).step()
        with torch.no_grad():
            model(x)
        return {"ok": True, "params": sum(p.numel() for p in model.parameters()) / before}
    except Exception as exc:
        return {"ok": False, "error": exception_line(exc, limit=160)}


def _attempt_in_child(name: str, source: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "fxprune.benchmarks.zoo", "--one", name, "--source", source]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)  # its code is read below
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"hang (no result in {timeout:.0f} s)"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"crashed: {tail[:160]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxprune bench zoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["zoo"])
    p.add_argument("--source", choices=["timm", "torchvision"], default="timm")
    p.add_argument("--models", nargs="*", help="names or glob patterns (default: the whole sweep)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a Torch-Pruning attempt may take (default 120)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # one Torch-Pruning attempt, in a child process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(torch_pruning_attempt(args.one, args.source)), flush=True)
        return 0
    names = timm_models() if args.source == "timm" else classification_models()
    if args.models:
        names = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in args.models)]
    rows, t0 = [], time.perf_counter()
    for name in names:
        r = check_model(name, source=args.source)
        ours = "not prepared" if r.stage in ("build", "prepare") else ("equivalent" if r.ok else "FAILED")
        tp = _attempt_in_child(name, args.source, args.timeout)
        theirs = "forward runs" if tp["ok"] else ("hang" if tp["error"].startswith("hang") else "fails")
        rows.append([name, ours, f"{100 * r.prunable_fraction:.1f}" if r.channels else "-", theirs,
                     f"{tp['params']:.2f}" if tp["ok"] else tp["error"]])
        print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    print(tabulate(rows, headers=["model", "fxprune", "prunable %", "Torch-Pruning 0.5", "params kept / error"],
                   tablefmt="github"))
    n = len(rows)
    count = lambda col, v: sum(r[col] == v for r in rows)
    print(f"\n{n} models, {time.perf_counter() - t0:.0f} s. fxprune: {count(1, 'equivalent')} equivalent, "
          f"{count(1, 'not prepared')} not prepared, {count(1, 'FAILED')} prepared but not equivalent. "
          f"Torch-Pruning: {count(3, 'forward runs')} forward runs, {count(3, 'fails')} fail, {count(3, 'hang')} hang.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
