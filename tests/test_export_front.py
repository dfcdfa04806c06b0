"""The torch.export front end: a model symbolic tracing refuses is prepared from its ATen
graph, and the rest of the pipeline (analysis, gates, training with live removal, convert,
export of the compact model) works the same on it."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netgen import networks
from test_equivalence import assert_compact_equals_gated, rel_err
from torch import nn
from train_loop import train_steps
from wrapped_ops import UsesWrapped

import fxprune
from fxprune.testing import implied_param_count, random_masks


class ShapeBranch(nn.Module):
    """A forward that branches on the input's size (as timm's CrossViT and SAM do): symbolic
    tracing cannot evaluate ``x.shape[-1] != 8``, torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 4))

    def forward(self, x):
        if x.shape[-1] != 8:
            x = F.interpolate(x, size=(8, 8), mode="bilinear")
        x = self.conv(x)
        x = F.relu(x + self.block(x))
        return self.head(self.norm(x.mean((2, 3))))


def test_a_model_symbolic_tracing_refuses_is_prepared_through_torch_export():
    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(4, 3, 8, 8)
    with pytest.raises(fxprune.TraceError, match="ShapeBranch"):
        fxprune.prepare(model, (x,), front_end="symbolic")
    gated = fxprune.prepare(model, (x,))
    front, why = fxprune.front_end_of(gated)
    assert front == "export" and "cannot trace module 'ShapeBranch'" in why
    assert not any("aten" in str(n.target) for n in gated.graph.nodes if n.op == "call_function"), \
        "every ATen op of this model is read by a rule"
    cg = fxprune.channel_graph(gated)
    prunable, channels = cg.prunable_share()
    assert prunable == channels - 4, "all but the output are prunable, the residual stream and LayerNorm included"
    gated.eval()
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
    random_masks(gated, keep=0.5, seed=1)
    compact = fxprune.convert(gated).eval()
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)
    for batch in (x, torch.randn(7, 3, 8, 8)):  # the batch size stayed symbolic
        with torch.no_grad():
            assert rel_err(compact(batch), gated(batch)) <= 1e-5
    with torch.no_grad():
        ep = torch.export.export(compact, (x,))
        assert rel_err(ep.module()(x), gated(x)) <= 1e-5


def test_batch_norm_found_again_as_its_module_follows_train_and_eval():
    torch.manual_seed(0)
    model, x = ShapeBranch(), torch.randn(4, 3, 8, 8)
    gated = fxprune.prepare(model, (x,))
    bns = [n for n in gated.graph.nodes if n.op == "call_module" and isinstance(gated.get_submodule(n.target), nn.BatchNorm2d)]
    assert len(bns) == 3
    bn = gated.get_submodule(bns[0].target)
    before = bn.running_mean.clone()
    gated.train()
    gated(x)
    assert not torch.equal(bn.running_mean, before), "training updates the running statistics"
    gated.eval()
    with torch.no_grad():
        assert torch.equal(gated(x), gated(x)), "eval mode uses them, and dropout is off"


def test_training_an_exported_model_through_live_removals_and_converting():
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    config = fxprune.PruneConfig(target_flops=0.4, warmup=0, budget_steps=20, decide=60, check_every=5, theta_lr=0.5)
    gated = fxprune.prepare(ShapeBranch(), (x[:4],), config)
    assert fxprune.front_end_of(gated)[0] == "export"
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(gated, opt)
    gated.train()
    train_steps(gated, opt, pruner, [(x, y)] * 70)
    assert pruner.decided and any(now < before for _, before, now in pruner.widths()), "something was removed while training"
    gated.eval()
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        assert rel_err(compact(x), gated(x)) <= 1e-5
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in ShapeBranch().parameters())


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def test_a_model_neither_front_end_reads_gets_both_reasons():
    with pytest.raises(fxprune.TraceError) as err:
        fxprune.prepare(ValueBranch(), (torch.randn(2, 4),))
    msg = str(err.value)
    assert "cannot trace module 'ValueBranch'" in msg and "torch.export cannot export 'ValueBranch'" in msg


class Cumulative(nn.Module):
    """``torch.cumsum`` over the channels: no rule reads it; its ATen op stays in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[0] > 0:  # symbolic tracing refuses this
            x = self.a(x)
        return self.c(torch.cumsum(self.b(F.relu(x)), dim=-1))


def test_an_aten_op_without_a_rule_runs_and_freezes_its_channels_naming_it():
    gated = fxprune.prepare(Cumulative(), (torch.randn(2, 4),))
    reasons = fxprune.channel_graph(gated).frozen_reasons()
    assert any("aten::cumsum" in r or "cumsum" in r for r in reasons), reasons
    cg = fxprune.channel_graph(gated)
    assert cg.prunable_share()[0] == 8, "a's units stay prunable, b's are frozen by cumsum"
    random_masks(gated, keep=0.5, seed=0).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert rel_err(fxprune.convert(gated).eval()(x), gated(x)) <= 1e-5


def test_front_end_is_checked():
    with pytest.raises(ValueError, match="front_end must be one of"):
        fxprune.prepare(nn.Linear(2, 2), (torch.randn(2, 2),), front_end="dynamo")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=networks(), keep=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 1000))
def test_convert_equals_gated_model_through_torch_export(net, keep, seed):
    """The hypothesis grammar's networks, traced by torch.export instead of symbolic tracing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = assert_compact_equals_gated(*net, keep, seed, front_end="export")
    assert fxprune.front_end_of(gated)[0] == "export"


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        for i in range(x.shape[1] // 8):  # symbolic tracing cannot iterate over a size
            x = x + self.fc(x) * i
        return x


class WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.inner, self.b = nn.Linear(4, 8), Inner(), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(F.relu(self.inner(self.a(x))))


def assert_export_reads_what_symbolic_tracing_keeps_whole(model_cls: type, x: torch.Tensor, why: str) -> None:
    """Symbolically traced, ``model_cls`` has nothing prunable; auto takes torch.export,
    says ``why``, reads 16 channels prunable, and the compact model equals the gated one."""
    symbolic = fxprune.prepare(model_cls(), (x,), front_end="symbolic")
    assert fxprune.front_end_of(symbolic)[0] == "symbolic"
    assert fxprune.channel_graph(symbolic).prunable_share()[0] == 0
    gated = fxprune.prepare(model_cls(), (x,))
    front, reason = fxprune.front_end_of(gated)
    assert front == "export" and why in reason, reason
    assert fxprune.channel_graph(gated).prunable_share()[0] == 16
    random_masks(gated, keep=0.5, seed=0).eval()
    with torch.no_grad():
        assert rel_err(fxprune.convert(gated).eval()(x), gated(x)) <= 1e-5


def test_submodules_symbolic_tracing_keeps_whole_are_read_through_torch_export():
    """Symbolic tracing keeps an untraceable submodule whole (a leaf, every channel it touches
    frozen); auto takes torch.export, which reads into it."""
    assert_export_reads_what_symbolic_tracing_keeps_whole(WithLeaf, torch.randn(3, 4), "kept 1 submodule(s) ('inner'")


class DataLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.odd = ValueBranch()

    def forward(self, x):
        return self.b(F.relu(self.a(x))) + self.odd(x[:, :4]).sum()


def test_where_torch_export_fails_too_the_symbolic_trace_with_its_leaves_stands():
    gated = fxprune.prepare(DataLeaf(), (torch.randn(3, 4),))
    front, why = fxprune.front_end_of(gated)
    assert front == "symbolic" and "torch.export failed" in why
    assert fxprune.channel_graph(gated).prunable_share()[0] == 8


# ---------------------------------------------------------------- transformers' models
# (the extra is imported by the test that needs it: without it, that test alone is skipped)


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def _tiny(kind: str):
    T = pytest.importorskip("transformers")
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=50, num_key_value_heads=2, **common)), torch.randint(0, 50, (2, 7))
    if kind == "bert":
        return T.BertForSequenceClassification(T.BertConfig(vocab_size=50, **common)), torch.randint(0, 50, (2, 7))
    return (T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, **common)), torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("kind", ["llama", "bert", "vit"])
def test_transformers_models_symbolic_tracing_cannot_read_are_pruned_through_torch_export(kind):
    """transformers' models fail symbolic tracing inside (masks built with Python control
    flow, sizes unpacked from shapes): through torch.export their heads, head_dims, MLP units
    and residual width (Llama's hand-written RMSNorm recognised) are prunable, and the compact
    model equals the gated one, on another batch and sequence length too."""
    torch.manual_seed(0)
    model, x = _tiny(kind)
    model.config._attn_implementation = "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = fxprune.prepare(Logits(model.eval()), (x,), mode="eval")
    assert fxprune.front_end_of(gated)[0] == "export"
    cg = fxprune.channel_graph(gated)
    prunable, channels = cg.prunable_share()
    assert all(r.startswith("model output") for r in cg.frozen_reasons()), cg.frozen_reasons()
    assert prunable > 0.9 * channels - 50  # all but the logits
    # heads x head_dim pruned as products; Llama's rotary tables keep q's and k's head_dim whole (v's is pruned)
    heads = {o.rsplit(".", 1)[-1]: cg.head_shape(o) for o, _ in cg.layer_outputs if ".0." in o and cg.head_shape(o)}
    want = {"llama": {"v_proj": (2, 8)}, "bert": dict.fromkeys(("query", "key", "value"), (4, 8)),
            "vit": dict.fromkeys(("q_proj", "k_proj", "v_proj"), (4, 8))}[kind]
    assert heads == want
    random_masks(gated, keep=0.5, seed=0).eval()
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        assert rel_err(compact(x), gated(x)) <= 1e-5
        other = torch.randint(0, 50, (3, 11)) if kind != "vit" else torch.randn(3, 3, 16, 16)
        assert rel_err(compact(other), gated(other)) <= 1e-5
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)


def test_a_wrapped_function_no_rule_reads_is_read_through_torch_export_when_that_prunes_more():
    x = torch.randn(3, 4)
    symbolic = fxprune.prepare(UsesWrapped(), (x,), front_end="symbolic")
    assert any(n.target.__name__ == "scaled_mix" for n in symbolic.graph.nodes if n.op == "call_function"
               and hasattr(n.target, "__name__"))
    assert_export_reads_what_symbolic_tracing_keeps_whole(UsesWrapped, x, "kept scaled_mix whole")
