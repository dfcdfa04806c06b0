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
