"""Model-zoo sweep: every torchvision classifier (or one or two models of every timm
family, or the transformers architectures of :mod:`.hf_zoo`), pruned at random and
checked numerically.

For each model: ``prepare`` -> ``random_masks(keep)`` -> ``convert``; the compact model's
outputs must equal the gated model's (eval mode) within ``rtol`` of the output scale,
its parameter count must equal the one the masks imply, and ``torch.export.export`` of
it must run and give the same outputs. A model that cannot be prepared (traced) is
listed with its reason, apart from the ones that fail after it. Run as ``fxprune zoo``
(``--source timm`` for timm, ``--source transformers`` for transformers, optional extras:
random init, nothing downloaded).
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
import torchvision

from ..api import channel_graph, convert, prepare
from ..passes import front_end_of
from ..passes.compact import max_relative_error
from ..passes.errors import exception_line
from ..passes.trace import bind_inputs
from ..passes.tracer import as_call
from .masks import implied_param_count, random_masks

__all__ = ["ZooResult", "check_model", "classification_models", "timm_models", "build_model", "input_size", "summary", "main"]

#: Models that only accept one input resolution, or need a larger one than the default.
_SIZES = {"vit_*": 224, "maxvit_t": 224, "inception_v3": 96, "swin*": 64}
DEFAULT_SIZE = 64


def classification_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


#: name parts of small variants, smallest first (a timm family's sweep model is its smallest)
_SMALL = ("atto", "femto", "pico", "nano", "xxs", "tiny", "xs", "mini", "small", "_t", "_s", "18", "b0", "s0", "lite")
_LARGE = ("giant", "gigantic", "huge", "large", "xxl", "_xl", "448", "512", "384", "_h_", "_g_", "_e_", "_l_", "_b_")


def _size_rank(name: str) -> tuple[int, int, int]:
    small = next((i for i, k in enumerate(_SMALL) if k in name), len(_SMALL))
    return (any(k in name for k in _LARGE), small, len(name))


def timm_models(second_from: int = 10) -> list[str]:
    """One model per timm family (module), its smallest variant by name, and a second one
    for families of at least ``second_from`` models: about 130 models."""
    import timm

    out = []
    for module in timm.list_modules():
        names = sorted(timm.list_models(module=module), key=_size_rank)
        out += names[:2 if len(names) >= second_from else 1]
    return out


def build_model(name: str, source: str, seed: int, batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """Model ``name`` of ``source`` ("torchvision" or "timm"), random init, perturbed, in eval
    mode, and an example input of ``batch`` examples at the sweep's size."""
    torch.manual_seed(seed)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        return perturb(model.eval(), seed), torch.randn(batch, *size)
    model = torchvision.models.get_model(name, weights=None).eval()
    return perturb(model, seed), torch.randn(batch, 3, input_size(name), input_size(name))


def input_size(name: str) -> int:
    return next((s for pat, s in _SIZES.items() if fnmatch.fnmatch(name, pat)), DEFAULT_SIZE)


@dataclass
class ZooResult:
    name: str
    equivalent: bool = False
    max_rel_err: float = float("nan")
    params_before: int = 0
    params_after: int = 0
    params_implied: int = 0
    exported: bool = False
    prunable: int = 0
    channels: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    #: where it failed: "build" (the model itself), "prepare" (tracing, analysis) or "convert" (or later)
    stage: str = ""
    #: the tracing front end prepare took: "symbolic" or "export" (when symbolic tracing failed, or asked for)
    front_end: str = ""

    @property
    def prunable_fraction(self) -> float:
        return self.prunable / self.channels if self.channels else 0.0

    @property
    def ok(self) -> bool:
        return self.equivalent and self.exported and self.params_after == self.params_implied and not self.error

    def line(self) -> str:
        if self.error:
            verdict = "not prepared" if self.stage in ("build", "prepare") else "FAIL"
            return f"{self.name:<24} {verdict}  ({self.stage}) {self.error}"
        return (
            f"{self.name:<24} {'ok  ' if self.ok else 'FAIL'}  err {self.max_rel_err:8.1e}  "
            f"params {self.params_before / 1e6:8.2f}M -> {self.params_after / 1e6:7.2f}M  "
            f"prunable {100 * self.prunable_fraction:5.1f}% of {self.channels} channels  "
            f"export {'ok' if self.exported else 'FAIL'}  {self.seconds:5.1f}s"
            + ("  (traced by torch.export)" if self.front_end == "export" else "")
        )


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give constant-initialised tensors random values, so that slicing one of them
    wrongly shows in the outputs: every floating tensor whose entries are all equal
    (norm weights and biases, layer scales such as ConvNeXt's 1e-6, zero-initialised
    biases and heads) and BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() < 2:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_((torch.rand(t.shape, generator=g) - 0.5) * 0.4)
            elif t.max() == t.min():
                if t.dim() >= 2:  # a zero-initialised weight matrix (ViT's head)
                    t.copy_(torch.randn(t.shape, generator=g) * 0.02)
                elif t.max() == 0:  # a zero bias
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
                else:  # norm weights, layer scales
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model


def _no_cache(model: torch.nn.Module) -> dict:
    """``use_cache=False`` for a forward that takes it: the gated model is traced without the
    generation cache (:func:`fxprune.passes.trace.bind_inputs`)."""
    import inspect

    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _check_same(want: object, got: object, rtol: float, what: str) -> None:
    if type(got) is not type(want):
        raise TypeError(f"{what} returns {type(got).__name__}, the model {type(want).__name__}")
    err = max_relative_error(got, want)
    if not err <= rtol:
        raise ValueError(f"{what} differs from the model by {err:.1e} (relative)")


def check_model(name: str, keep: float = 0.5, seed: int = 0, rtol: float = 1e-4, batch: int = 2,
                source: str = "torchvision", front_end: str = "auto") -> ZooResult:
    """Prepare (through ``front_end``), randomly mask, convert and export model ``name`` of
    ``source`` ("torchvision", "timm" or "transformers"). transformers' models are taken as
    users hold them: the hub's class, called with keywords, prepared in the default mode
    (train and eval), and the gated model checked against the model itself first."""
    res, t0 = ZooResult(name), time.perf_counter()
    try:
        res.stage = "build"
        if source == "transformers":
            from .hf_zoo import build_transformer

            model, args, kwargs = build_transformer(name, seed)
            model.eval()
        else:
            model, x = build_model(name, source, seed, batch)
            args, kwargs = (x,), {}
        res.params_before = sum(p.numel() for p in model.parameters())
        res.stage = "prepare"
        with warnings.catch_warnings():  # the sweep reports the prunable share and its reasons itself
            warnings.simplefilter("ignore")
            if source == "transformers":
                gated = prepare(model, args, kwargs=kwargs, front_end=front_end)
                with torch.no_grad():
                    own = model(*args, **kwargs, **_no_cache(model))
                    _check_same(own, gated.eval()(*args, **kwargs), rtol, "the gated model")
            else:
                gated = prepare(model, args, mode="eval", front_end=front_end, inplace=True)  # an eval-mode sweep
        res.front_end = front_end_of(gated)[0]
        res.stage = "convert"
        cg = channel_graph(gated)
        res.prunable, res.channels = cg.prunable_share()
        res.reasons = cg.frozen_reasons()
        random_masks(gated, keep=keep, seed=seed).eval()
        compact = convert(gated).eval()
        res.params_after = sum(p.numel() for p in compact.parameters())
        res.params_implied = implied_param_count(gated)
        with torch.no_grad():
            ref = gated(*args, **kwargs)
            res.max_rel_err = max_relative_error(compact(*args, **kwargs), ref)
            res.equivalent = res.max_rel_err <= rtol
            # every parameter given, defaults included: export binds a GraphModule's inputs by position
            every, by_name = as_call(compact, bind_inputs(compact, args, kwargs)[0])
            ep = torch.export.export(compact, every, by_name)
            res.exported = max_relative_error(ep.module()(*every, **by_name), ref) <= rtol
        res.stage = ""
    except Exception as exc:
        res.error = exception_line(exc, limit=300)
    res.seconds = time.perf_counter() - t0
    gc.collect()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxprune zoo", description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=["torchvision", "timm", "transformers"], default="torchvision",
                   help="torchvision: every classifier; timm (optional extra): one or two models per family; "
                        "transformers (optional extra): the hub's classes from tiny random configs")
    p.add_argument("--models", nargs="*", help="names or glob patterns (default: the whole sweep)")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--front-end", choices=["auto", "symbolic", "export"], default="auto",
                   help="auto: symbolic tracing, torch.export where it fails; or only one of them")
    args = p.parse_args(argv)
    if args.source == "timm":
        try:
            import timm
        except ImportError:
            p.error("--source timm needs timm: pip install 'fxprune[timm]'")
        names = timm_models()
    elif args.source == "transformers":
        try:
            import transformers  # noqa: F401
        except ImportError:
            p.error("--source transformers needs transformers: pip install 'fxprune[transformers]'")
        from .hf_zoo import TRANSFORMERS

        names = list(TRANSFORMERS)
    else:
        names = classification_models()
    if args.models:
        wanted = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in args.models)]
        if args.source == "timm":  # any timm model may be named, not only the sweep's
            import timm

            wanted = sorted(set(wanted) | {n for pat in args.models for n in timm.list_models(pat)})
        if not wanted:
            p.error(f"no {args.source} model matches {args.models}")
        names = wanted
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    for name in names:
        results.append(check_model(name, keep=args.keep, seed=args.seed, source=args.source, front_end=args.front_end))
        print(results[-1].line(), flush=True)
    low = [r for r in results if not r.error and r.prunable_fraction < 0.5]
    if low:
        print("\nModels with less than half of their conv/linear channels prunable, and why:")
        for r in low:
            print(f"  {r.name} ({100 * r.prunable_fraction:.1f}%):")
            for reason, n in list(r.reasons.items())[:4]:
                print(f"    {n:>6} channels: {reason}")
    print(summary(results))
    return 0 if all(r.ok or r.stage in ("build", "prepare") for r in results) else 1


def summary(results: list[ZooResult]) -> str:
    """Counts (equivalent, not prepared, failed after prepare) and the median prunable share."""
    prepared = [r for r in results if r.stage not in ("build", "prepare")]
    ok = [r for r in prepared if r.ok]
    shares = sorted(r.prunable_fraction for r in prepared if r.channels)
    median = f"{100 * statistics.median(shares):.1f} %" if shares else "-"
    lines = [f"{len(ok)}/{len(results)} models equivalent; {len(results) - len(prepared)} not prepared; "
             f"{len(prepared) - len(ok)} prepared but not equivalent; median prunable share {median}"]
    lines.extend(f"  not prepared: {r.name}: {r.error}" for r in results if r.stage in ("build", "prepare"))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
