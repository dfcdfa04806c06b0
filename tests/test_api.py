"""prepare / convert / random_masks: behaviour and errors."""

import numpy as np
import pytest
import torch
import torchvision
from fxprune.passes import Compact

import fxprune
from fxprune.state import UnitGate, decisions, set_decisions, state_of, theta_of
from fxprune.testing import implied_param_count, random_masks


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return model, torch.randn(2, 3, 32, 32)


def test_prepare_copies_the_model_unless_told_to_share_it(resnet):
    model, x = resnet
    gated = fxprune.prepare(model, (x,)).eval()
    assert gated.get_submodule("conv1").weight is not model.conv1.weight
    torch.testing.assert_close(gated.get_submodule("conv1").weight, model.conv1.weight)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), model(x))
    shared = fxprune.prepare(model, (x,), inplace=True)
    assert shared.get_submodule("conv1").weight is model.conv1.weight


def test_random_masks_keep_fraction_and_never_empty_a_space(resnet):
    model, x = resnet
    gated = random_masks(fxprune.prepare(model, (x,)), keep=0.0, seed=3)
    cg = fxprune.channel_graph(gated)
    unit_keep, _ = decisions(gated)
    for gid, keep in unit_keep.items():
        for s in cg.groups[gid].spaces:
            assert cg.keep_indices(s, unit_keep).size >= 1
    random_masks(gated, keep=0.5, seed=3)
    unit_keep, _ = decisions(gated)
    assert all(abs(k.mean() - 0.5) < 0.05 for k in unit_keep.values())


def test_convert_is_plain_and_equivalent(resnet):
    model, x = resnet
    gated = random_masks(fxprune.prepare(model, (x,)), keep=0.5, seed=1).eval()
    compact = fxprune.convert(gated).eval()
    assert not any("fxprune" in name for name, _ in compact.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in compact.parameters()) == implied_param_count(gated)
    assert compact.conv1.out_channels == compact.conv1.weight.shape[0] == compact.bn1.num_features < 64


def test_a_group_switched_off_keeps_its_best_unit(resnet):
    model, x = resnet
    gated = fxprune.prepare(model, (x,), fxprune.PruneConfig(min_share=0.0)).eval()  # the floor is one unit
    gid = next(iter(state_of(gated).layout.units))
    theta = theta_of(gated, UnitGate(gid))
    with torch.no_grad():
        theta.copy_(torch.linspace(0.0, 0.4, theta.numel()))  # all below 0.5
    keep = decisions(gated)[0][gid]
    assert keep.sum() == 1 and keep[-1]
    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)


def test_compaction_refuses_to_empty_a_channel_dimension(resnet):
    model, x = resnet
    gated = fxprune.prepare(model, (x,))
    cg = fxprune.channel_graph(gated)
    gid = cg.prunable_groups[0].id
    empty = {gid: np.zeros(cg.groups[gid].num_units, dtype=bool)}
    with pytest.raises(ValueError, match="cannot become empty"):
        Compact(cg, empty, set())(fxprune.trace(model, (x,)))


def test_convert_needs_a_gated_model(resnet):
    model, _ = resnet
    with pytest.raises(ValueError, match="fxprune.prepare"):
        fxprune.convert(torch.fx.symbolic_trace(model))


def test_layer_gates_off_delete_the_branch(resnet):
    model, x = resnet
    gated = fxprune.prepare(model, (x,), fxprune.PruneConfig(structures="layers")).eval()
    set_decisions(gated, {}, {b: False for b in state_of(gated).layout.layers})
    compact = fxprune.convert(gated).eval()
    names = {n for n, _ in compact.named_modules()}
    assert "layer1.0.conv1" not in names and "layer2.0.conv1" not in names
    assert "layer2.0.downsample.0" in names  # a projection block leaves its shortcut
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)


def test_compact_model_compiles(resnet):
    model, x = resnet
    gated = random_masks(fxprune.prepare(model, (x,)), keep=0.5, seed=2).eval()
    compact = fxprune.convert(gated).eval()
    compiled = torch.compile(compact)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), compact(x), rtol=1e-4, atol=1e-4)


def test_config_validates():
    with pytest.raises(ValueError, match="structures"):
        fxprune.PruneConfig(structures="filters")


class _MostlyFrozen(torch.nn.Module):
    """Two linear layers around an op the analysis has no rule for (cumsum over channels)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(4, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.cumsum(self.fc1(x), -1))


def test_prepare_warns_when_little_is_prunable_naming_the_main_reason():
    with pytest.warns(UserWarning, match=r"only 0 of the 40 output channels of _MostlyFrozen.* \(0 %\) are prunable; "
                                         r"the main reasons: .*cumsum.*\(32 channels\)"):
        fxprune.prepare(_MostlyFrozen(), (torch.randn(2, 4),))


def test_prepare_does_not_warn_when_most_is_prunable(recwarn):
    fxprune.prepare(torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)),
                    (torch.randn(2, 4),))
    fxprune.prepare(_MostlyFrozen(), (torch.randn(2, 4),), fxprune.PruneConfig("layers"))  # no unit gates asked for
    assert not [w for w in recwarn if "prunable" in str(w.message)]
