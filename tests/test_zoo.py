"""The torchvision model-zoo sweep (marked ``zoo``: `make test` runs it after the fast tests)."""

import pytest

from fxprune.testing.zoo import check_model, classification_models

MODELS = classification_models()


def test_zoo_has_every_classifier():
    assert len(MODELS) >= 80


@pytest.mark.zoo
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_prunes_equivalently(name):
    r = check_model(name, keep=0.5, seed=0)
    print(r.line())
    assert not r.error, r.error
    assert r.equivalent, f"max relative error {r.max_rel_err:.2e}"
    assert r.params_after == r.params_implied < r.params_before
    assert r.exported
    if r.prunable_fraction < 0.5:
        assert r.reasons, "a mostly frozen model must say why"
