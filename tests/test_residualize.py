"""residualize: shortcuts around plain sections, found as branches, removable exactly."""

import pytest
import torch
from fxprune.passes import residualize
from torch import nn

import fxprune
from fxprune.digits.models import lenet5, lenet_300_100, vgg
from fxprune.state import set_decisions, state_of
from fxprune.testing import random_masks


def test_vgg_sections_become_branches_with_identity_or_projection():
    x = torch.randn(4, 1, 8, 8)
    gm = residualize(vgg(), (x,))
    p = gm.meta["fxprune_residualize"]
    kinds = [s.shortcut for s in p.sections]
    # 8 convs: channel changes (1->32, 32->64, 64->128) get 1x1 projections, the rest identities
    assert kinds.count("identity") == 5 and len(kinds) == 8
    assert isinstance(gm.get_submodule(kinds[0]), nn.Conv2d)
    assert p.skipped == [("28", "its output is the model's output")]
    cg = fxprune.channel_graph(fxprune.prepare(gm, (x,)))
    assert len(cg.branches) == 8
    # the branch is the section, never the shortcut
    assert not any(n.startswith("shortcut") for br in cg.branches.values() for n in br.nodes)


def test_mlp_sections_get_linear_projections():
    gm = residualize(lenet_300_100(), (torch.randn(4, 1, 8, 8),))
    kinds = [s.shortcut for s in gm.meta["fxprune_residualize"].sections]
    assert [type(gm.get_submodule(k)) for k in kinds] == [nn.Linear, nn.Linear]


@pytest.mark.parametrize("build", [vgg, lenet5])
def test_removed_sections_leave_the_shortcut_exactly(build):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    gated = fxprune.prepare(residualize(build(), (x,)), (x,)).eval()
    random_masks(gated, keep=0.5, seed=3)
    set_decisions(gated, {}, {sorted(state_of(gated).layout.layers)[1]: False})  # at least one section goes

    compact = fxprune.convert(gated).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gated(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in build().parameters())


def test_strided_projection_matches_the_section_shape():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    x = torch.randn(2, 3, 7, 7)
    gm = residualize(model, (x,))
    proj = gm.get_submodule(gm.meta["fxprune_residualize"].sections[0].shortcut)
    assert proj.stride == (2, 2) and gm(x).shape == (2, 2)


def test_nothing_to_wrap_is_a_clear_error():
    with pytest.raises(ValueError, match="no section to wrap.*model's output"):
        residualize(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (torch.randn(2, 1, 8, 8),))
    with pytest.raises(ValueError, match="size must be"):
        fxprune.passes.Residualize(size=0)


def test_size_two_sections_span_two_layers():
    gm = residualize(vgg(), (torch.randn(2, 1, 8, 8),), size=2)
    sections = gm.meta["fxprune_residualize"].sections
    convs = [[n for n in s.nodes if isinstance(gm.get_submodule(n.lstrip("_")), nn.Conv2d)] for s in sections]
    # pairs of convs, except where a pooling or the 3-conv stage ends a run
    assert [len(c) for c in convs] == [2, 2, 1, 2, 1]
