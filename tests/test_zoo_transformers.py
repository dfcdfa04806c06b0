"""The transformers sweep (marked ``zoo``): every architecture of fxprune.testing.hf_zoo,
the hub's class from a tiny random config, prepared as given in the default mode, pruned
at random, converted and exported, each checked numerically against the model itself."""

import pytest

from fxprune.testing.hf_zoo import TRANSFORMERS
from fxprune.testing.zoo import check_model

#: the prunable share each architecture reaches at least (measured: README, `fxprune zoo --source transformers`);
#: below half, the reasons are asserted to be the ones the README gives
FLOORS = {"gpt_neox": 0.45, "t5": 0.15}


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_architecture_prunes_equivalently(name):
    r = check_model(name, keep=0.5, seed=0, source="transformers")
    print(r.line())
    assert not r.error, r.error
    assert r.equivalent, f"max relative error {r.max_rel_err:.2e}"
    assert r.params_after == r.params_implied < r.params_before
    assert r.exported
    assert r.prunable_fraction >= FLOORS.get(name, 0.6)
    if r.prunable_fraction < 0.5:
        assert r.reasons, "a mostly frozen model must say why"


#: what carries gates, per architecture (heads incl. grouped-query attention, head_dim, MLP units, the residual
#: width); False where the README says why: an encoder's residual width is its output (last_hidden_state),
#: GPT-NeoX's fused q/k/v interleaves heads, Phi-3's fused q/k/v split is not factorised into heads, T5's
#: attention goes through copies the analysis does not follow
STRUCTURES = {
    "bert": (True, True, True, False), "roberta": (True, True, True, False), "distilbert": (True, True, True, False),
    "gpt2": (True, True, True, True), "gpt_neox": (False, False, True, True), "opt": (True, True, True, True),
    "llama": (True, True, True, True), "mistral": (True, True, True, True), "qwen2": (True, True, True, True),
    "phi3": (False, False, True, True), "gemma": (True, True, True, True), "t5": (False, False, True, False),
    "vit": (True, True, True, False), "whisper": (True, True, True, True),
}
CAUSAL = ["gpt2", "gpt_neox", "opt", "llama", "mistral", "qwen2", "phi3", "gemma"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_each_architecture_gates_its_heads_mlp_and_residual_width(name):
    import warnings

    import fxprune
    from fxprune.testing.hf_zoo import build_transformer, structures

    model, args, kwargs = build_transformer(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = fxprune.prepare(model, args, kwargs=kwargs)
    got = structures(gated)
    assert (got["heads"], got["head_dim"], got["mlp"], got["residual"]) == STRUCTURES[name], got


@pytest.mark.zoo
@pytest.mark.parametrize("name", CAUSAL)
def test_labels_give_each_causal_lm_its_own_loss(name):
    import warnings

    import torch

    import fxprune
    from fxprune.testing.hf_zoo import build_transformer

    model, args, kwargs = build_transformer(name)
    kwargs = {**kwargs, "labels": args[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = fxprune.prepare(model, args, kwargs=kwargs)
    model.eval()
    gated.eval()
    with torch.no_grad():
        want, got = model(*args, **kwargs, use_cache=False).loss, gated(*args, **kwargs).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
