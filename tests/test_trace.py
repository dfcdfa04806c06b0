"""Tracing pass: shapes in meta, leaf fallback with reasons, clear errors."""

import pytest
import torch
from fxprune.passes import TraceError
from torch import nn

import fxprune


class DataDependent(nn.Module):
    """Python control flow on tensor values: not symbolically traceable."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.odd = DataDependent(8)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.odd(torch.relu(self.stem(x)))
        return self.fc(torch.relu(self.mid(x)).mean((2, 3)))


def test_shapes_are_recorded():
    gm = fxprune.trace(WithUntraceable(), (torch.randn(2, 3, 8, 8),))
    mid = next(n for n in gm.graph.nodes if n.target == "mid")
    assert tuple(mid.meta["tensor_meta"].shape) == (2, 16, 8, 8)


def test_untraceable_submodule_becomes_a_leaf_and_freezes_its_channels():
    model = WithUntraceable()
    gm = fxprune.trace(model, (torch.randn(2, 3, 8, 8),))
    assert list(gm.meta["fxprune_leaves"]) == ["odd"]
    assert "odd" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    cg = fxprune.analyze(gm)
    stem_group = next(g for g in cg.groups.values() if any(b.owner == "stem" and b.role == "producer" for b in cg.bindings_of(g)))
    assert not stem_group.prunable
    assert "could not be traced" in stem_group.frozen[0] and "odd" in stem_group.frozen[0]
    mid_group = next(g for g in cg.groups.values() if any(b.owner == "mid" and b.role == "producer" for b in cg.bindings_of(g)))
    assert mid_group.prunable  # channels after the leaf are still prunable


def test_untraceable_top_level_names_module_and_line():
    with pytest.raises(TraceError) as err:
        fxprune.trace(DataDependent(3), (torch.randn(1, 3, 4, 4),))
    msg = str(err.value)
    assert "DataDependent" in msg and "if x.sum() > 0" in msg


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="example input"):
        fxprune.trace(WithUntraceable(), (torch.randn(2, 5, 8, 8),))


def test_wrong_number_of_inputs():
    with pytest.raises(ValueError, match=r"do not fit WithUntraceable.forward\(x\): too many positional"):
        fxprune.trace(WithUntraceable(), (torch.randn(2, 3, 8, 8), torch.randn(1)))


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fxprune.trace(lambda x: x, (torch.randn(1),))


def test_training_flag_is_restored():
    model = WithUntraceable().train()
    gm = fxprune.trace(model, (torch.randn(2, 3, 8, 8),))
    assert model.training and gm.training


class Counted(nn.Module):
    """Two untraceable submodules; counts how often its own forward is run."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.calls = DataDependent(3), DataDependent(3), 0

    def forward(self, x):
        self.calls += 1
        return self.b(torch.relu(self.a(x)))


def test_untraceable_submodules_cost_one_trace():
    model = Counted()
    gm = fxprune.trace(model, (torch.randn(2, 3, 4, 4),))
    assert sorted(gm.meta["fxprune_leaves"]) == ["a", "b"]
    assert model.calls == 1  # one symbolic trace, not one per leaf found
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["a", "b"]


class Buggy(nn.Module):
    def forward(self, x):
        return x + self.missing_attribute  # a plain bug, not a tracing limitation


def test_a_bug_in_a_submodule_is_reported_not_hidden():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Buggy())
    with pytest.raises((ValueError, TraceError)) as err:
        fxprune.trace(model, (torch.randn(1, 3, 4, 4),))
    assert "missing_attribute" in str(err.value) and "'1'" in str(err.value)


def shapes(gm):
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta
            and hasattr(n.meta["tensor_meta"], "shape")}


def test_shape_propagation_gives_the_same_shapes_for_real_and_on_meta():
    import torchvision
    from fxprune.passes.shape_prop import AdaptiveShapeProp

    model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 32, 32)
    real, meta = torch.fx.symbolic_trace(model), torch.fx.symbolic_trace(model)
    AdaptiveShapeProp(real, meta=False).propagate(x)
    prop = AdaptiveShapeProp(meta, meta_seconds_per_node=0.0)  # switches to meta after the first node
    with torch.no_grad():
        prop.propagate(x)
    assert prop.on_meta and shapes(real) == shapes(meta) and len(shapes(real)) > 50


class NeedsValues(nn.Module):
    """Runs for real, but not on the meta device (it reads a value)."""

    def forward(self, x):
        return x * float(x.abs().max().item() > -1)


def test_an_op_without_a_meta_kernel_runs_for_real_and_prints_nothing(capfd):
    import sys

    from fxprune.passes.shape_prop import propagate_shapes

    stderr = sys.stderr
    leaf = fxprune.trace(nn.Sequential(nn.Conv2d(3, 4, 3), NeedsValues()), (torch.randn(1, 3, 6, 6),))
    assert "1" in leaf.meta["fxprune_leaves"]
    for n in leaf.graph.nodes:
        n.meta.pop("tensor_meta", None)
    propagate_shapes(leaf, (torch.randn(1, 3, 6, 6),), meta_seconds_per_node=0.0)  # meta fails at the leaf
    assert sys.stderr is stderr
    out, err = capfd.readouterr()
    assert not out and not err
    assert shapes(leaf)["_1"] == (1, 4, 4, 4)
