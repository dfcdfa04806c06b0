"""register_rule: users tell the analysis what their own modules, functions and methods do
to channels; what they register is read (the channels become prunable, the compact
model computes what the gated model computes), and a handle undoes it."""

import pytest
import torch
from torch import fx, nn

import fxprune
from fxprune.passes import register_rule
from fxprune.passes.analysis import unread_functions
from fxprune.passes.analysis.generic import passthrough
from fxprune.passes.compact import max_relative_error
from fxprune.testing import random_masks


class DataDependentClip(nn.Module):
    """Symbolic tracing cannot go in (control flow on a tensor's value)."""

    def forward(self, x):
        return x.clamp(max=0.5) if bool(x.abs().max() > 0.5) else x


def doubled(x):
    return x * 2.0


fx.wrap("doubled")  # kept whole by symbolic tracing: a call_function node no built-in rule reads


class Net(nn.Module):
    def __init__(self, middle="module"):
        super().__init__()
        self.a, self.b, self.middle = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), middle
        self.clip = DataDependentClip()

    def forward(self, x):
        h = self.a(x)
        if self.middle == "module":
            h = self.clip(h)
        elif self.middle == "function":
            h = doubled(h)
        else:
            h = h.nan_to_num()
        return self.b(h)


RULES = {"module": DataDependentClip, "function": doubled, "method": "nan_to_num"}


@pytest.mark.parametrize("kind", list(RULES))
def test_a_registered_rule_makes_the_op_read_and_the_compact_model_equivalent(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = Net(kind).eval()
    with pytest.warns(UserWarning, match="prunable"):
        gated = fxprune.prepare(model, (x,), mode="eval", front_end="symbolic")
    assert fxprune.channel_graph(gated).prunable_share()[0] == 0  # frozen without a rule
    with register_rule(RULES[kind], passthrough):
        gated = fxprune.prepare(model, (x,), mode="eval", front_end="symbolic")
        assert fxprune.channel_graph(gated).prunable_share()[0] == 8
        if kind == "function":
            assert "doubled" not in unread_functions(gated)
        random_masks(gated, keep=0.5, seed=1)
        gated.eval()
        with torch.no_grad():
            want = gated(x)
            compact = fxprune.convert(gated)
            assert compact.get_submodule("a").out_channels == 4
            assert max_relative_error(compact(x), want) < 1e-5
            assert max_relative_error(model(x), model(x)) == 0
    with pytest.warns(UserWarning, match="prunable"):  # the handle's exit undid the registration
        fxprune.prepare(model, (x,), mode="eval", front_end="symbolic")


def test_remove_restores_the_rule_registered_before():
    calls = []

    def first(b, n):
        calls.append("first")
        return passthrough(b, n)

    def second(b, n):
        calls.append("second")
        return passthrough(b, n)

    x = torch.randn(2, 3, 8, 8)
    h1 = register_rule("nan_to_num", first)
    try:
        h2 = register_rule("nan_to_num", second)
        fxprune.analyze(fxprune.trace(Net("method").eval(), (x,)))
        h2.remove()
        h2.remove()  # twice is harmless
        fxprune.analyze(fxprune.trace(Net("method").eval(), (x,)))
    finally:
        h1.remove()
    assert calls == ["second", "first"]


@pytest.mark.parametrize("target, rule, message", [
    (int, passthrough, "not an nn.Module subclass"),
    ("not a name", passthrough, "not a tensor method's name"),
    (3, passthrough, "cannot register a rule for 3"),
    (DataDependentClip, "passthrough", "must be a callable"),
])
def test_bad_registrations_are_refused_by_name(target, rule, message):
    with pytest.raises((TypeError, ValueError), match=message):
        register_rule(target, rule)
