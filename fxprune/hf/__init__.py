"""A stock Hugging Face model back from a pruned one: :func:`to_pretrained`.

transformers is an optional extra, imported here only. The compact model keeps the
prepared model's parameter names (``model.layers.0.mlp.gate_proj.weight``), so the stock
model of the same class, built from a config that carries the pruned sizes, loads its
weights as they are (layers renumbered where whole blocks went), and is checked to
compute what the compact model computes.

Example::

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> ids = torch.randint(0, 64, (2, 8))
    >>> gated = fxprune.prepare(LlamaForCausalLM(cfg), (ids,))
    >>> hf_model = fxprune.hf.to_pretrained(gated)        # or a model fxprune.convert gave
    >>> hf_model.save_pretrained("pruned")                 # AutoModelForCausalLM.from_pretrained("pruned")
    >>> type(hf_model).__name__, hf_model.config.num_hidden_layers
    ('LlamaForCausalLM', 2)
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import fx

from ..api import convert
from ..passes.compact import max_relative_error
from ..passes.tracer import as_call
from ..state import COMPACT, STATE, CompactOrigin

__all__ = ["to_pretrained", "ConversionError", "FAMILIES"]

#: ``config.model_type`` of the decoder families whose layout :func:`to_pretrained` reads
#: (``model.layers.<i>.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``model.embed_tokens``)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class ConversionError(ValueError):
    """The pruned widths cannot be written in a stock config of the model's class."""


def _kept(origin: CompactOrigin, gid: int) -> int:
    keep = origin.unit_keep.get(gid)
    return int(keep.sum()) if keep is not None else origin.graph.groups[gid].num_units


def _head_dims(origin: CompactOrigin, q_param: str) -> int | None:
    """The kept head_dim of the attention whose query projection is ``q_param`` (None when
    its heads are not a product of heads x head_dim)."""
    cg = origin.graph
    canon = cg.aliases.get(q_param, q_param)
    for b in cg.bindings:
        if b.param == canon and b.dim == 0:
            g = cg.groups[cg.spaces[b.space].group]
            if g.derived:
                return _kept(origin, g.factor_ids()[1][0])
    return None


def _uniform(values: dict[int, int], what: str) -> int:
    if len(set(values.values())) > 1:
        listing = ", ".join(f"layer {i}: {v}" for i, v in sorted(values.items()))
        raise ConversionError(f"the layers keep different {what} ({listing}): a stock config has one; prune with "
                              "PruneConfig(uniform=True)")
    return next(iter(values.values()))


def to_pretrained(model: fx.GraphModule) -> Any:
    """The stock transformers model of the prepared model's class whose config carries the
    pruned sizes (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``, ``intermediate_size``, ``num_hidden_layers``) and whose weights are the
    compact model's. ``model`` is a gated model (converted here) or the compact model
    :func:`fxprune.convert` gave. Raises :class:`ConversionError`, naming the layers and what
    would make it possible, where no stock config describes the widths (layers that differ:
    ``uniform=True``; a pruned head_dim, from which the class derives its attention scale and
    rotary frequencies; one branch of a block removed without the other), or where the stock
    model does not compute what the compact one does (checked on the stored example)."""
    compact = convert(model) if STATE in getattr(model, "meta", {}) else model
    origin = getattr(compact, "meta", {}).get(COMPACT)
    if not isinstance(origin, CompactOrigin):
        raise ValueError(f"{type(model).__name__} is neither a gated model nor one fxprune.convert gave")
    cls, config = origin.origin or (None, None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConversionError(f"to_pretrained reads the decoder layout of {', '.join(FAMILIES)}; the model was "
                              f"{getattr(cls, '__name__', cls)} (model_type {model_type!r})")
    state = compact.state_dict()
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ratio = config.num_attention_heads // config.num_key_value_heads
    kept_head_dim = {i: min(_head_dims(origin, f"model.layers.{i}.self_attn.{p}_proj.weight") or head_dim
                            for p in "qkv") for i in layers}  # q.k and v.o each have a head_dim
    if any(v != head_dim for v in kept_head_dim.values()):
        pruned = ", ".join(f"layer {i}: {v}" for i, v in kept_head_dim.items() if v != head_dim)
        raise ConversionError(
            f"head_dim was pruned ({head_dim} -> {pruned}): {cls.__name__} derives its attention scale and rotary "
            f"frequencies from head_dim, so no stock config describes it; keep head_dim whole with "
            f"PruneConfig(multiple_of={head_dim}) or a multiple of it")
    q = {i: state[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0] for i in layers}
    k = {i: state[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] for i in layers
         if f"model.layers.{i}.self_attn.k_proj.weight" in state}
    mlp = {i: state[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0] for i in layers
           if f"model.layers.{i}.mlp.gate_proj.weight" in state}
    half = sorted(set(layers) - set(k) | set(layers) - set(mlp))
    if half:
        raise ConversionError(f"layers {half} lost their attention or their MLP but not both: a stock decoder layer "
                              "has both; prune with PruneConfig(structures='units'), or keep whole blocks together")
    new = copy.deepcopy(config)
    new.hidden_size = state["model.embed_tokens.weight"].shape[1]
    new.num_attention_heads = _uniform(q, "query widths") // head_dim
    new.num_key_value_heads = _uniform(k, "key/value widths") // head_dim
    if new.num_attention_heads != new.num_key_value_heads * ratio and new.num_key_value_heads:
        raise ConversionError(f"the kept heads ({new.num_attention_heads}) are not {ratio} per key/value head")
    new.head_dim = head_dim
    new.intermediate_size = _uniform(mlp, "MLP widths")
    new.num_hidden_layers = len(layers)
    if hasattr(new, "layer_types") and getattr(new, "layer_types", None):
        new.layer_types = [new.layer_types[i] for i in layers]
    renumber = {old: i for i, old in enumerate(layers)}
    weights = {}
    for key, value in state.items():
        m = _LAYER.match(key)
        weights[f"model.layers.{renumber[int(m.group(1))]}.{key[m.end():]}" if m else key] = value
    stock = cls(new)
    expected = set(stock.state_dict())
    missing = expected - set(weights)
    if missing:
        raise ConversionError(f"the compact model has no tensor for {sorted(missing)[:4]} of {cls.__name__}")
    stock.load_state_dict({k: weights[k] for k in expected}, strict=True)
    stock.to(next(compact.parameters()).device).eval()
    _check_same(stock, compact, origin.example)
    return stock


def _check_same(stock: Any, compact: fx.GraphModule, example: tuple) -> None:
    """The stock model computes what the compact one does on the stored example, called
    by keyword with the arguments that hold a value."""
    args, kwargs = as_call(compact, list(example))
    was = compact.training
    compact.eval()
    try:
        with torch.no_grad():
            want = compact(*example)
            got = stock(*args, **{k: v for k, v in kwargs.items() if v is not None})
    finally:
        compact.train(was)
    err = max_relative_error(got, want)
    if not err <= 1e-5:
        raise ConversionError(f"the stock {type(stock).__name__} differs from the compact model by {err:.1e} "
                              f"(relative) on the stored example: its config cannot describe this pruned model")
