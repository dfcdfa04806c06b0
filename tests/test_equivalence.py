"""Property: for random networks and random masks, the compact model equals the gated one."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netgen import networks

import fxprune
from fxprune.testing import implied_param_count, random_masks


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=networks(), keep=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 1000))
def test_convert_equals_gated_model(net, keep, seed):
    assert_compact_equals_gated(*net, keep, seed)


def assert_compact_equals_gated(model, x, keep, seed, **prepare_kwargs):
    """Gates at 1 leave the model as it was; under random masks the compact model equals the
    gated one and has the parameters the masks imply, and no fxprune module."""
    with torch.no_grad():
        dense = model(x)
    gated = fxprune.prepare(model, (x,), **prepare_kwargs).eval()
    with torch.no_grad():
        assert rel_err(gated(x), dense) <= 1e-6, "gates at 1 must not change the model"
    random_masks(gated, keep=keep, seed=seed)
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        ref = gated(x)
        out = compact(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)
    assert not any(n.op == "call_module" and "fxprune" in str(n.target) for n in compact.graph.nodes)
    return gated


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(net=networks())
def test_compact_model_exports(net):
    model, x = net
    gated = random_masks(fxprune.prepare(model, (x,)), keep=0.5, seed=1).eval()
    compact = fxprune.convert(gated).eval()
    ep = torch.export.export(compact, (x,))
    with torch.no_grad():
        assert rel_err(ep.module()(x), gated(x)) <= 1e-4
