"""Hugging Face transformers' models as users hold them: the hub's classes (no wrapper),
called with keywords, in the default mode, returning their own output type; pruned
exactly; saved with safetensors and torch.save."""

import io
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import tree_leaves

import fxprune
from fxprune.testing import random_masks
from fxprune.testing.hf_zoo import TRANSFORMERS, build_transformer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _prepare(name, **kw):
    model, args, kwargs = build_transformer(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own notes on random configs
        gated = fxprune.prepare(model, args, kwargs=kwargs, **kw)
    return model, args, kwargs, gated


def _reference(model, args, kwargs):
    """The model's own output, without the generation cache the gated model is traced without."""
    import inspect

    use_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        return model(*args, **kwargs, **use_cache)


def _close(a, b, tol=1e-5):
    pairs = [(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b)) if isinstance(x, torch.Tensor)]
    assert pairs and len(tree_leaves(a)) == len(tree_leaves(b))
    for x, y in pairs:
        torch.testing.assert_close(y, x, rtol=tol, atol=tol * max(1.0, float(x.abs().max())))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_a_hub_model_prepares_as_given_in_the_default_mode_and_returns_its_own_output_type(name):
    """Issue reproduction: prepare(GPT2LMHeadModel(cfg), (ids,)) and Llama failed with
    'co_varnames is too small' and the export fallback failed too; BertModel in the default
    mode was refused as a bad graph (two runs with dropout compared)."""
    model, args, kwargs, gated = _prepare(name)
    model.eval()
    gated.eval()
    want = _reference(model, args, kwargs)
    with torch.no_grad():
        got = gated(*args, **kwargs)
    assert type(got) is type(want)
    _close(want, got)
    assert fxprune.front_end_of(gated)[0] == "export"


def test_dropout_stays_active_in_training_and_off_in_eval():
    model, args, kwargs, gated = _prepare("bert")
    gated.eval()
    with torch.no_grad():
        first, second = gated(*args, **kwargs), gated(*args, **kwargs)
    torch.testing.assert_close(first.last_hidden_state, second.last_hidden_state, rtol=0, atol=0)
    gated.train()
    with torch.no_grad():
        a, b = gated(*args, **kwargs).last_hidden_state, gated(*args, **kwargs).last_hidden_state
    assert not torch.equal(a, b) and not torch.equal(a, first.last_hidden_state)


def test_attention_dropout_follows_the_mode():
    """F.scaled_dot_product_attention(dropout_p=p if self.training else 0): traced in training
    mode, its rate was a constant, and the eval-mode graph dropped attention weights."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5 if self.training else 0.0)
            return self.out(y.transpose(1, 2).reshape(x.shape))

    model, x = Attention(), torch.randn(2, 5, 16)
    gated = fxprune.prepare(model, (x,))  # mode="both": one graph for both modes
    gated.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gated(x), model(x))
    gated.train()
    with torch.no_grad():
        assert not torch.allclose(gated(x), model(x))


def test_labels_give_the_models_own_loss():
    model, args, kwargs = build_transformer("llama")
    kwargs = {**kwargs, "labels": args[0]}
    gated = fxprune.prepare(model, args, kwargs=kwargs)
    model.eval()
    gated.eval()
    want = _reference(model, args, kwargs)
    with torch.no_grad():
        got = gated(*args, **kwargs)
    assert got.loss.dim() == 0
    torch.testing.assert_close(got.loss, want.loss)


def test_a_keyword_the_forward_does_not_name_is_refused_clearly():
    model, args, kwargs = build_transformer("llama")
    with pytest.raises(ValueError, match="no parameter 'output_router_logits'"):
        fxprune.prepare(model, args, kwargs={**kwargs, "output_router_logits": True})


def test_gpt2_conv1d_and_fused_qkv_are_prunable():
    """Issue reproduction: GPT-2 was 0 % prunable in every set-up, and frozen_reasons()
    raised a TypeError on it."""
    model, args, kwargs, gated = _prepare("gpt2")
    cg = fxprune.channel_graph(gated)
    prunable, channels = cg.prunable_share()
    assert prunable / channels > 0.9
    assert list(cg.frozen_reasons()) == ["model output 'lm_head'"]  # the vocabulary, and nothing else


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_the_compact_model_computes_what_the_gated_one_does_and_keeps_its_output_type(name):
    model, args, kwargs, gated = _prepare(name)
    random_masks(gated, keep=0.5, seed=0).eval()
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        want, got = gated(*args, **kwargs), compact(*args, **kwargs)
    assert type(got) is type(want)
    _close(want, got)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())


def test_buffers_are_contiguous_and_models_save_with_safetensors_and_torch_save(tmp_path):
    """Issue reproduction: GateRead's [factors, channels] index was a transposed buffer, so
    safetensors (the HF Trainer's save) refused a freshly prepared BERT; torch.load of a
    compact BERT failed (torch.load traces a GraphModule's code again, and its buffers were
    handed to that code as real tensors)."""
    model, args, kwargs, gated = _prepare("bert")
    assert all(b.is_contiguous() for b in gated.buffers())
    save_file(dict(gated.state_dict()), tmp_path / "gated.safetensors")
    random_masks(gated, keep=0.5, seed=0).eval()
    compact = fxprune.convert(gated).eval()
    save_file(dict(compact.state_dict()), tmp_path / "compact.safetensors")
    loaded = load_file(tmp_path / "compact.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in compact.state_dict().items())
    buf = io.BytesIO()
    torch.save(compact, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False).eval()
    with torch.no_grad():
        want, got = compact(*args, **kwargs), again(*args, **kwargs)
    assert type(got) is type(want)
    _close(want, got, tol=0)


def test_every_architecture_of_the_sweep_builds():
    assert {"bert", "roberta", "distilbert", "gpt2", "gpt_neox", "opt", "llama", "mistral", "qwen2", "phi3", "gemma",
            "t5", "vit", "whisper"} <= set(TRANSFORMERS)
    with pytest.raises(ValueError, match="no transformers architecture 'nope'"):
        build_transformer("nope")
    assert isinstance(build_transformer("mistral")[0], tf.MistralForCausalLM)


# ---------------------------------------------------------------- back to a stock checkpoint
def _switch_off(gated, group, count):
    layout, bank = fxprune.state.state_of(gated).layout, fxprune.state.gate_bank(gated)
    with torch.no_grad():
        bank.theta[layout.units[group].start:layout.units[group].start + count] = 0.0


def test_to_pretrained_gives_a_stock_model_that_saves_and_reloads_equal(tmp_path):
    import fxprune.hf

    model, args, kwargs, gated = _prepare("llama")
    heads, head_dims, mlps = fxprune.state.gate_bank(gated).roles  # one class per role, a group per layer
    for g in mlps:
        _switch_off(gated, g, 40)
    for g in heads:
        _switch_off(gated, g, 1)  # one key/value head of two, with its two query heads
    stock = fxprune.hf.to_pretrained(gated)
    assert type(stock) is type(model)
    cfg = stock.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.hidden_size) == (2, 1, 56, 64)
    stock.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(*args, **kwargs).logits, compact(*args, **kwargs).logits, rtol=1e-5, atol=1e-5)
    assert fxprune.hf.to_pretrained(compact).config.intermediate_size == 56  # from the compact model too


def test_to_pretrained_names_the_layers_a_stock_config_cannot_describe():
    import fxprune.hf

    model, args, kwargs, gated = _prepare("llama")
    heads, head_dims, mlps = fxprune.state.gate_bank(gated).roles
    _switch_off(gated, mlps[0], 40)
    with pytest.raises(fxprune.hf.ConversionError, match=r"layer 0: 56, layer 1: 96.*uniform=True"):
        fxprune.hf.to_pretrained(gated)
    model, args, kwargs, gated = _prepare("llama")
    for g in fxprune.state.gate_bank(gated).roles[1]:
        _switch_off(gated, g, 4)
    with pytest.raises(fxprune.hf.ConversionError, match=r"head_dim was pruned \(16 -> layer 0: 12.*multiple_of=16"):
        fxprune.hf.to_pretrained(gated)
    with pytest.raises(fxprune.hf.ConversionError, match="GPT2LMHeadModel"):
        fxprune.hf.to_pretrained(_prepare("gpt2")[3])


def test_the_compact_package_of_a_hub_model_returns_its_output_type(tmp_path):
    """save_compact's package rebuilds the modules transformers' graphs hold tensors in
    (plain nn.Module holders) and returns the model's own output type; a graph with the body
    of a higher-order op (Llama's rotary embedding runs under autocast(enabled=False)) is a
    clear PackageError, not a pickle."""
    import importlib.util
    import sys

    from fxprune.export import PackageError, save_compact

    model, args, kwargs, gated = _prepare("bert")
    random_masks(gated, keep=0.5, seed=0)
    compact = fxprune.convert(gated).eval()
    paths = save_compact(compact, (args[0], kwargs["attention_mask"]), tmp_path / "bert")
    spec = importlib.util.spec_from_file_location("bert_compact", paths["package"] / "module.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bert_compact"] = module
    try:
        spec.loader.exec_module(module)
        rebuilt = module.CompactModel().eval()
    finally:
        del sys.modules["bert_compact"]
    with torch.no_grad():
        want, got = compact(*args, **kwargs), rebuilt(*args, **kwargs)
    assert type(got) is type(want)
    _close(want, got, tol=0)
    model, args, kwargs, gated = _prepare("llama")
    with pytest.raises(PackageError, match="submod_1"):
        save_compact(fxprune.convert(gated), (args[0], kwargs["attention_mask"]), tmp_path / "llama")
    assert not any((tmp_path / "llama").iterdir())  # nothing partial written
