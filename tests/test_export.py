"""Saving the compact model: the .pt2 program and the Python package load in a process
without fxprune and give the compact model's outputs."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

import fxprune
from fxprune.digits.models import resnet, vgg
from fxprune.export import save_compact
from fxprune.testing import random_masks

MODELS = {
    "digits-resnet": (lambda: resnet(blocks=2, widths=(8, 12)), (4, 1, 8, 8)),
    "vgg+residualize": (lambda: fxprune.residualize(vgg(0.25), (torch.zeros(2, 1, 8, 8),)), (4, 1, 8, 8)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (2, 3, 64, 64)),
}

LOADER = textwrap.dedent("""
    import sys
    sys.modules["fxprune"] = None  # loading must not need fxprune
    import torch
    folder = sys.argv[1]
    x = torch.load(folder + "/x.pt")
    sys.path.insert(0, folder)
    from compact_model import CompactModel
    package = CompactModel().eval()
    program = torch.export.load(folder + "/model.pt2").module()
    torch.save({"package": package(x), "pt2": program(x)}, folder + "/outputs.pt")
""")


@pytest.mark.parametrize("name", list(MODELS))
def test_saved_compact_model_loads_without_fxprune(tmp_path, name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    gated = random_masks(fxprune.prepare(build().eval(), (x,)), keep=0.5, seed=1).eval()
    compact = fxprune.convert(gated).eval()
    paths = save_compact(compact, (x,), tmp_path / "out")
    assert paths["pt2"].is_file() and paths["state_dict"].is_file()
    # the folder can be moved: no absolute paths inside
    moved = tmp_path / "moved"
    (tmp_path / "out").rename(moved)
    torch.save(x, moved / "x.pt")
    subprocess.run([sys.executable, "-c", LOADER, str(moved)], check=True, cwd=tmp_path)
    outputs = torch.load(moved / "outputs.pt")
    expected = compact(x)
    torch.testing.assert_close(outputs["package"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["pt2"], expected, rtol=1e-5, atol=1e-5)
    state = torch.load(moved / "compact_model" / "state_dict.pt")
    assert set(state) == set(compact.state_dict())


def test_saving_a_gated_model_or_to_an_unwritable_path_is_a_clear_error(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    gated = fxprune.prepare(resnet(blocks=1, widths=(4,)), (x,))
    with pytest.raises(ValueError, match="fxprune.convert"):
        save_compact(gated, (x,), tmp_path / "out")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError, match="cannot write the compact model"):
        save_compact(fxprune.convert(gated.eval()), (x,), tmp_path / "a-file" / "out")
