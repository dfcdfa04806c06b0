"""A sample of the timm sweep (marked ``zoo``; `fxprune zoo --source timm` runs all of it).

timm is an optional extra that `make test` installs; without it the module is skipped,
and pytest's summary says so."""

import pytest
import torch

from fxprune.testing.zoo import check_model, summary, timm_models

timm = pytest.importorskip("timm", reason="the timm sweep needs the optional extra: pip install 'fxprune[timm]'")

#: one model of each kind of timm building block: ViT/DeiT/EVA (class token, attention),
#: ConvNeXt (LayerNorm2d, layer scale), Swin, PVT, LeViT, MobileViT, EfficientViT, ResNet-D
SAMPLE = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "eva02_tiny_patch14_224", "convnext_atto",
          "swinv2_cr_tiny_224", "pvt_v2_b0", "levit_128", "mobilevit_xxs", "efficientvit_b0", "resnet18d"]


def test_sweep_takes_one_or_two_models_of_every_family_and_at_least_100():
    names = timm_models()
    assert len(names) >= 100 and len(set(names)) == len(names)
    for module in timm.list_modules():
        assert 1 <= len(set(timm.list_models(module=module)) & set(names)) <= 2, module


@pytest.mark.zoo
@pytest.mark.parametrize("name", SAMPLE)
def test_timm_model_prunes_equivalently(name):
    r = check_model(name, keep=0.5, seed=0, source="timm")
    print(r.line())
    assert not r.error, r.line()
    assert r.equivalent, f"max relative error {r.max_rel_err:.2e}"
    assert r.params_after == r.params_implied < r.params_before
    assert r.exported
    assert r.reasons  # the head's logits at least: every frozen channel is explained


@pytest.mark.zoo
def test_a_model_symbolic_tracing_refuses_is_prepared_through_torch_export():
    r = check_model("crossvit_tiny_240", source="timm")  # "not prepared" before the torch.export front end
    assert r.ok and r.front_end == "export", r.line()
    assert "traced by torch.export" in r.line()


class _ValueBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x.mean((2, 3))) if x.sum() > 0 else x.mean((2, 3))


def test_a_model_that_cannot_be_prepared_is_listed_with_its_reason_not_as_a_failure(monkeypatch):
    import fxprune.testing.zoo as zoo

    monkeypatch.setattr(zoo, "build_model", lambda *a: (_ValueBranch(), torch.randn(2, 3, 4, 4)))
    r = check_model("value_branch", source="timm")  # neither front end reads a branch on a value
    assert r.stage == "prepare" and "_ValueBranch" in r.error
    assert "not prepared" in r.line()
    assert "1 not prepared" in summary([r]) and "value_branch" in summary([r])


def test_torch_pruning_side_by_side_runs_it_once_and_reports_a_hang_as_one():
    pytest.importorskip("torch_pruning", reason="the comparison needs the bench extra")
    from fxprune.benchmarks.zoo import _attempt_in_child, torch_pruning_attempt

    r = torch_pruning_attempt("resnet18d", "timm")
    assert r["ok"] and 0.1 < r["params"] < 0.5
    assert _attempt_in_child("resnet18d", "timm", timeout=0.01) == {"ok": False, "error": "hang (no result in 0 s)"}
