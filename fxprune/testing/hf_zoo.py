"""The transformers architectures of ``fxprune zoo --source transformers``: each from a
tiny random config (nothing downloaded), as users hold it (the hub's class, not a
wrapper), with the inputs it takes: token ids and an attention mask, pixel values
(ViT), log-mel features (Whisper's encoder), or encoder and decoder ids (T5).

Each config keeps every structure the architecture has: grouped-query attention
(``num_key_value_heads`` < ``num_attention_heads``) where the family has it, Mistral's
sliding window, Gemma's head_dim set apart from ``hidden_size / heads``, GPT-2's
``Conv1D`` and fused q/k/v, Phi-3's fused q/k/v and gate/up projections.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["TRANSFORMERS", "build_transformer", "structures"]

_VOCAB, _SEQ, _BATCH = 96, 12, 2


def _decoder(cls: str, config: str, **kw: Any) -> Callable[[], tuple[torch.nn.Module, tuple, dict]]:
    def build() -> tuple[torch.nn.Module, tuple, dict]:
        import transformers as tf

        cfg = getattr(tf, config)(vocab_size=_VOCAB, **kw)
        ids = torch.randint(0, _VOCAB, (_BATCH, _SEQ))
        return getattr(tf, cls)(cfg), (ids,), {"attention_mask": torch.ones_like(ids)}
    return build


_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
_BERT_LIKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)


def _vit() -> tuple[torch.nn.Module, tuple, dict]:
    import transformers as tf

    cfg = tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, **_BERT_LIKE)
    return tf.ViTModel(cfg), (torch.randn(_BATCH, 3, 32, 32),), {}


def _whisper() -> tuple[torch.nn.Module, tuple, dict]:
    import transformers as tf

    cfg = tf.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96,
                           decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=96, num_mel_bins=16,
                           max_source_positions=8, vocab_size=_VOCAB)
    return tf.WhisperForAudioClassification(cfg), (torch.randn(_BATCH, 16, 16),), {}


def _t5() -> tuple[torch.nn.Module, tuple, dict]:
    import transformers as tf

    cfg = tf.T5Config(vocab_size=_VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)  # type: ignore[call-arg]  # a PretrainedConfig keyword
    ids = torch.randint(0, _VOCAB, (_BATCH, _SEQ))
    return tf.T5ForConditionalGeneration(cfg), (ids,), {"attention_mask": torch.ones_like(ids),
                                                        "decoder_input_ids": ids[:, :8].clone()}


#: name -> builder of ``(model, args, kwargs)``
TRANSFORMERS: dict[str, Callable[[], tuple[torch.nn.Module, tuple, dict]]] = {
    "bert": _decoder("BertModel", "BertConfig", **_BERT_LIKE),
    "roberta": _decoder("RobertaModel", "RobertaConfig", pad_token_id=1, **{**_BERT_LIKE, "max_position_embeddings": 66}),
    "distilbert": _decoder("DistilBertModel", "DistilBertConfig", dim=64, hidden_dim=96, n_layers=2, n_heads=4,
                           max_position_embeddings=64),
    "gpt2": _decoder("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0),
    "gpt_neox": _decoder("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
    "opt": _decoder("OPTForCausalLM", "OPTConfig", hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64),
    "llama": _decoder("LlamaForCausalLM", "LlamaConfig", **_LLAMA_LIKE),
    "mistral": _decoder("MistralForCausalLM", "MistralConfig", sliding_window=8, **_LLAMA_LIKE),
    "qwen2": _decoder("Qwen2ForCausalLM", "Qwen2Config", **_LLAMA_LIKE),
    "phi3": _decoder("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, **_LLAMA_LIKE),
    "gemma": _decoder("GemmaForCausalLM", "GemmaConfig", head_dim=24, **_LLAMA_LIKE),
    "t5": _t5,
    "vit": _vit,
    "whisper": _whisper,
}


def build_transformer(name: str, seed: int = 0) -> tuple[torch.nn.Module, tuple, dict]:
    """Architecture ``name`` of :data:`TRANSFORMERS`, random init: ``(model, args, kwargs)``."""
    if name not in TRANSFORMERS:
        raise ValueError(f"no transformers architecture {name!r} in the sweep: pick one of {sorted(TRANSFORMERS)}")
    torch.manual_seed(seed)
    return TRANSFORMERS[name]()


#: the parameters of an MLP's first projection, by family (``mlp.gate_proj``, ``intermediate.dense``, ``c_fc``, ...)
_MLP = re.compile(r"(mlp\.(gate_proj|up_proj|c_fc|fc1|dense_h_to_4h|gate_up_proj)|intermediate\.dense|ffn\.lin1|\.fc1|"
                  r"DenseReluDense\.wi|output\.dense)\.weight$")
#: the token (or patch) embedding whose width is the residual stream
_EMBED = re.compile(r"(embed_tokens|word_embeddings|wte|embed_in|shared|patch_embeddings\.projection|conv1)\.weight$")


def structures(gated: torch.fx.GraphModule) -> dict[str, bool]:
    """Which of a transformer's structures carry gates: ``heads`` (a product group whose
    heads factor is gated), ``head_dim`` (its head_dim factor), ``mlp`` (the units of an
    MLP's first projection) and ``residual`` (the embedding's width)."""
    from ..state import state_of

    state = state_of(gated)
    cg, gated_groups = state.graph, set(state.layout.units)
    out = {"heads": False, "head_dim": False, "mlp": False, "residual": False}
    for g in cg.groups.values():
        if g.derived:
            heads, dims = (set(ids) for ids in g.factor_ids()[:2])
            out["heads"] |= heads <= gated_groups
            out["head_dim"] |= dims <= gated_groups
    for b in cg.bindings:
        group = cg.spaces[b.space].group
        if group not in gated_groups:
            continue
        names = cg.params[b.param].names  # a tied embedding is reached as the output head too
        if b.role == "producer" and any(_MLP.search(n) for n in names) and not cg.groups[group].derived:
            out["mlp"] = True
        conv = any("conv1" in n or "projection" in n for n in names)
        embedding = any(_EMBED.search(n) for n in names) or (b.owner.startswith("embedding") and b.role == "producer")
        if embedding and b.dim == (0 if conv else 1):
            out["residual"] = True
    return out
