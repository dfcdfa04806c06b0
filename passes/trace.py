"""Tracing pass: ``nn.Module`` -> ``GraphModule`` with shapes in ``node.meta``.

* Inputs: the example inputs are bound to ``forward``'s parameters like a call
  (positional, then ``kwargs``); a parameter left out takes its default, and every
  parameter whose value holds no tensor (``mask=None``, ``scale=1.0``, ``is_causal=False``)
  is specialised to it (``torch.fx``'s ``concrete_args``): the traced model asserts it
  gets that value, instead of tracing ``mask is not None`` as always true.
* Modes: ``mode="eval"`` traces the eval-mode forward, ``"train"`` the training one, and
  ``"both"`` traces both and refuses, naming the first node where they differ, a model
  with training-only code (an ``if self.training:`` branch, such as the auxiliary heads
  of GoogLeNet and Inception). In every mode functional dropout with a constant
  ``training`` flag becomes a dropout module that follows ``train()``/``eval()``
  (:mod:`.modes`).
* Submodules that cannot be traced become leaves, and custom autograd.Functions stay one
  node (:mod:`.tracer`).
* Front ends (``front_end="auto"``): a model whose top level symbolic tracing cannot
  trace is traced with ``torch.export`` instead (:mod:`.export_front`; checked against
  the model on the example inputs); where export fails too, a :class:`TraceError` names
  the model and both failures. ``front_end_of(gm)`` says which front end a graph came
  from and why. (``prepare`` goes further: where symbolic tracing kept submodules or
  wrapped functions whole, it traces with both and keeps the more prunable graph.)
* ``nn.MultiheadAttention`` self-attention is written out as the ops it computes
  (:mod:`.decompose`), so the analysis sees its heads, and RMSNorm written out by hand
  becomes ``F.rms_norm`` (:mod:`.recognize`), so the analysis reads it as a norm.

Example::

    >>> gm = trace(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["tensor_meta"].shape
    torch.Size([1, 64, 32, 32])
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from .decompose import DecomposeAttention
from .errors import exception_line
from .export_front import FRONT_END_META, export_trace
from .modes import FollowModuleMode, first_difference
from .recognize import RecognizeRMSNorm
from .reload import ReloadTracer
from .shape_prop import ShapePropError, propagate_shapes
from .tracer import LEAVES_META, LeafTracer, TraceError, as_call, reason

__all__ = ["TraceError", "LeafTracer", "trace", "bind_inputs", "forward_names", "restore_buffers", "LEAVES_META", "MODES", "FRONT_ENDS", "FRONT_END_META",
           "front_end_of"]

#: what ``trace`` and ``prepare`` accept as ``mode``
MODES = ("eval", "train", "both")
#: what ``trace`` and ``prepare`` accept as ``front_end``
FRONT_ENDS = ("auto", "symbolic", "export")


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in tree_leaves(value))


def bind_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
                ) -> tuple[list[Any], dict[str, Any]]:
    """``forward``'s arguments for a call ``model(*args, **kwargs)``, in parameter order
    (defaults filled in), and those that hold no tensor (they are specialised)."""
    kwargs = dict(kwargs or {})
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    name = type(model).__name__
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        if kwargs:
            raise ValueError(f"{name}.forward{sig} takes *args: give the example inputs positionally")
        return list(args), {}
    # a forward with **kwargs (transformers' models) is bound by its named parameters; the
    # extra keywords it passes on are not inputs of the graph
    named = [p for p in params if p.kind != p.VAR_KEYWORD]
    extra = [k for k in kwargs if k not in {p.name for p in named}]
    if extra:
        raise ValueError(f"{name}.forward has no parameter {', '.join(repr(k) for k in extra)} (it takes "
                         f"{', '.join(p.name for p in named)}): fxprune traces a forward's named parameters, "
                         "and keywords its **kwargs would take are not inputs of the graph")
    params = named
    sig = sig.replace(parameters=named)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"the example inputs do not fit {name}.forward{sig}: {exc}") from None
    values, concrete = [], {}
    for p in params:
        if p.name in bound.arguments:
            value = bound.arguments[p.name]
        elif p.name == "use_cache" and p.default is None:  # transformers: a cache is generation state, not trained
            value = False
        elif p.default is not p.empty:
            value = p.default
        else:
            raise ValueError(f"{name}.forward needs '{p.name}', which has no default: give it in the example inputs "
                             "or as a keyword input")
        if not _holds_tensor(value):
            concrete[p.name] = value
        values.append(value)
    return values, concrete


def _symbolic_trace(model: nn.Module, concrete: dict[str, Any]) -> fx.GraphModule:
    tracer = LeafTracer()
    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        graph = tracer.trace(model, concrete or None)
    except Exception as exc:
        raise TraceError(
            f"cannot trace module '{type(model).__name__}': {reason(exc)}. Make its forward symbolically traceable "
            "(no data-dependent Python control flow), or wrap the offending function with torch.fx.wrap."
        ) from exc
    finally:
        written = restore_buffers(model, before)
    if written:  # symbolic tracing runs a write with no traced input once, at trace time, and records nothing
        raise TraceError(
            f"cannot trace module '{type(model).__name__}': its forward writes into buffer "
            f"{', '.join(repr(n) for n in written)}, and symbolic tracing would run that write once instead of "
            "recording it. Make its forward symbolically traceable (no data-dependent Python control flow), or "
            "prepare with front_end='export', which keeps the write.")
    if concrete:  # a specialised argument defaults to its value, so the call may leave it out
        names = list(inspect.signature(model.forward).parameters)
        for name, node in zip(names, [n for n in graph.nodes if n.op == "placeholder"]):
            if name in concrete:
                node.args = (concrete[name],)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[LEAVES_META] = tracer.leaves
    FollowModuleMode()(gm)
    return gm


def restore_buffers(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Put ``model``'s buffers back to ``before`` (name -> value), in place; returns the
    names of those that had changed."""
    changed = []
    with torch.no_grad():
        for name, b in model.named_buffers():
            old = before.get(name)
            if old is not None and old.shape == b.shape and not torch.equal(b, old):
                changed.append(name)
                b.copy_(old)
    return changed


def forward_names(model: nn.Module, n: int) -> list[str]:
    """The names of ``forward``'s first ``n`` parameters (``args_i`` for ``*args``)."""
    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return [f"args_{i}" for i in range(n)]
    return [p.name for p in params[:n]]


def _same_outputs(model: nn.Module, gm: fx.GraphModule, values: list[Any]) -> None:
    """The exported graph computes what the model computes, on the example inputs, in eval
    mode (the rewrite of ATen ops into torch calls is checked, not trusted)."""
    model.eval()
    gm.eval()
    with torch.no_grad():
        args, kwargs = as_call(model, values)
        want, got = tree_leaves(model(*args, **kwargs)), tree_leaves(gm(*values))
    tensors = [(w, g) for w, g in zip(want, got) if isinstance(w, torch.Tensor)]
    if len(want) != len(got) or any(w.shape != g.shape for w, g in tensors) or any(
            not torch.allclose(g.float(), w.float(), rtol=1e-4, atol=1e-5 * max(float(w.float().abs().max()), 1.0))
            for w, g in tensors if w.numel()):
        raise TraceError(f"the graph torch.export gave for '{type(model).__name__}' does not compute what the model "
                         "computes on the example inputs: please report it, with the model")


def _graph_module(model: nn.Module, concrete: dict[str, Any], training: bool, values: list[Any],
                  front_end: str = "auto") -> fx.GraphModule:
    model.train(training)
    if isinstance(model, fx.GraphModule):  # already traced: a new graph, so the caller's is not changed
        gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
        gm.meta.update({k: v for k, v in model.meta.items() if k in (LEAVES_META, FRONT_END_META)})
        gm.meta.setdefault(LEAVES_META, {})
        gm.meta.setdefault(FRONT_END_META, ("symbolic", "a GraphModule given"))
        FollowModuleMode()(gm)
        return gm
    why = "front_end='export'"
    if front_end != "export":
        try:
            gm = _symbolic_trace(model, concrete)
            gm.meta[FRONT_END_META] = ("symbolic", "")
            return gm
        except TraceError as exc:
            if front_end == "symbolic":
                raise
            why = str(exc).split(". Make its forward")[0]
    try:
        gm = export_trace(model, values, forward_names(model, len(values)))
    except TraceError as exc:
        raise TraceError(f"{why}; {exc}" if front_end == "auto" else str(exc)) from exc
    gm.meta[LEAVES_META] = {}
    gm.meta[FRONT_END_META] = ("export", why)
    FollowModuleMode()(gm)
    _same_outputs(model, gm, values)
    model.train(training)
    return gm


def front_end_of(gm: fx.GraphModule) -> tuple[str, str]:
    """``(front end, why)``: ``"symbolic"`` (``torch.fx`` symbolic tracing) or ``"export"``
    (``torch.export``, taken when symbolic tracing failed, or asked for), and why."""
    return gm.meta.get(FRONT_END_META, ("symbolic", ""))


def trace(model: nn.Module, example_inputs: tuple[Any, ...] | torch.Tensor, kwargs: dict[str, Any] | None = None,
          *, mode: str = "eval", front_end: str = "auto") -> fx.GraphModule:
    """Trace ``model`` (in ``mode``: ``"eval"``, ``"train"`` or ``"both"``, see the
    module docstring) and propagate shapes with the example inputs (``kwargs`` are
    keyword inputs). Returns a ``GraphModule`` whose tensor nodes carry
    ``meta["tensor_meta"]``; fallback leaves are listed in ``gm.meta["fxprune_leaves"]``.
    The model's training flag is restored afterwards, and the result is in the same mode.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxprune.trace expects an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if front_end not in FRONT_ENDS:
        raise ValueError(f"front_end must be one of {FRONT_ENDS}, got {front_end!r}")
    values, concrete = bind_inputs(model, tuple(example_inputs), kwargs)
    was_training = model.training
    try:
        gm = _graph_module(model, concrete, mode != "eval", values, front_end)
        if mode == "both":
            other = "export" if front_end_of(gm)[0] == "export" else front_end  # both modes through one front end
            difference = first_difference(gm, _graph_module(model, concrete, False, values, other))
            if difference:
                raise TraceError(
                    f"{type(model).__name__}'s forward takes another path in training than in eval mode: {difference}. "
                    "fxprune gates one graph for both modes: prepare with mode='train' (the training graph, run in "
                    "eval mode too), mode='eval' (the training-only code is left out), or remove the training-only "
                    "code (torchvision's GoogLeNet and Inception: aux_logits=False)")
        model.eval()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(values):
            raise ValueError(
                f"{type(model).__name__}.forward takes {len(placeholders)} inputs "
                f"({', '.join(p.target for p in placeholders)}), but {len(values)} example inputs were given")
        gm.eval()
        try:
            propagate_shapes(gm, tuple(values))
            rewritten = [DecomposeAttention()(gm).modified, RecognizeRMSNorm()(gm).modified]
            if any(rewritten):  # heads written out, hand-written norms recognised: shapes for the new nodes
                propagate_shapes(gm, tuple(values))
        except ShapePropError as exc:
            node = exc.node
            where = f"module '{node.target}'" if node.op == "call_module" else f"node '{node.name}'"
            leaf = gm.meta[LEAVES_META].get(node.target) if node.op == "call_module" else None
            hint = (f"; it could not be traced either ({leaf})" if leaf else
                    ". Check the example inputs against what the model expects")
            raise ValueError(
                f"running {type(model).__name__} on the example inputs failed at {where}: "
                f"{exception_line(exc.cause)}{hint}"
            ) from exc
    finally:
        model.train(was_training)
    gm.train(was_training)
    gm._tracer_cls = ReloadTracer  # what torch.load rebuilds the graph with (its buffers traced, its output type kept)
    return gm
