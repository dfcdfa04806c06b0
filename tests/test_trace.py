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
    with pytest.raises(ValueError, match="takes 1 inputs"):
        fxprune.trace(WithUntraceable(), (torch.randn(2, 3, 8, 8), torch.randn(1)))


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fxprune.trace(lambda x: x, (torch.randn(1),))


def test_training_flag_is_restored():
    model = WithUntraceable().train()
    gm = fxprune.trace(model, (torch.randn(2, 3, 8, 8),))
    assert model.training and gm.training
