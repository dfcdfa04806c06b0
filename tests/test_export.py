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


def test_the_package_holds_no_pickle_and_loads_its_weights_with_weights_only(tmp_path):
    """to_folder pickled every module without a safe repr next to module.py (7 files for the
    digits ResNet, the weights a second time) and loaded them with weights_only=False: a
    replaced file ran a command at CompactModel()."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    gated = random_masks(fxprune.prepare(resnet(blocks=2, widths=(8, 12)).eval(), (x,)), keep=0.5, seed=1).eval()
    compact = fxprune.convert(gated).eval()
    paths = save_compact(compact, (x,), tmp_path / "out")
    package = paths["package"]
    assert sorted(p.name for p in package.iterdir() if p.is_file()) == ["__init__.py", "module.py", "state_dict.pt"]
    source = (package / "module.py").read_text()
    assert "weights_only=False" not in source and source.count("torch.load(") == 1 and "weights_only=True" in source
    torch.load(package / "state_dict.pt", weights_only=True)


class _Ran:
    def __reduce__(self):
        return (print, ("ran code",))


def test_a_replaced_state_dict_with_a_pickle_does_not_run(tmp_path, capfd):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    compact = fxprune.convert(fxprune.prepare(resnet(blocks=1, widths=(4,)).eval(), (x,)).eval())
    paths = save_compact(compact, (x,), tmp_path / "out")
    torch.save({"weight": _Ran()}, paths["state_dict"])
    loader = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from compact_model import CompactModel
        try:
            CompactModel()
        except Exception as exc:
            print("refused:", type(exc).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", loader, str(tmp_path / "out")], capture_output=True, text=True).stdout
    assert "refused: UnpicklingError" in out and "ran code" not in out


def test_a_failed_save_leaves_no_partial_files(tmp_path, monkeypatch):
    import fxprune.export as export

    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    compact = fxprune.convert(fxprune.prepare(resnet(blocks=1, widths=(4,)).eval(), (x,)).eval())

    def fail(*args, **kwargs):
        raise export.PackageError("module 'x' cannot be rebuilt")

    monkeypatch.setattr(export, "_write_package", fail)
    with pytest.raises(export.PackageError):
        save_compact(compact, (x,), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == [], "no model.pt2, no package, no staging folder"


def test_a_module_that_cannot_be_rebuilt_without_a_pickle_is_named():
    import fxprune.export as export

    class Custom(torch.nn.Module):
        def forward(self, x):
            return x * 2

    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    gm.add_submodule("c", Custom())  # a module the package could only pickle
    with pytest.raises(export.PackageError, match=r"module 'c' \(.*Custom\) cannot be rebuilt"):
        export._package_source(gm)


def _tamper(src, dst, edit):
    """Copy the zip archive ``src`` to ``dst`` with ``edit(name, bytes) -> bytes`` applied."""
    import zipfile
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            b.writestr(info, edit(info.filename, a.read(info.filename)))


class _Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _weight_marked_use_pickle(name, data, marker):
    import io
    import json
    if name.endswith("_weights_config.json"):
        config = json.loads(data)
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        return json.dumps(config).encode()
    if name.endswith("/data/weights/weight_0"):
        buffer = io.BytesIO()
        torch.save(_Touch(marker), buffer)
        return buffer.getvalue()
    return data


def _sample_inputs_object(name, data, marker):
    import io
    if name.endswith("/data/sample_inputs/model.pt"):
        buffer = io.BytesIO()
        torch.save(((_Touch(marker),), {}), buffer)
        return buffer.getvalue()
    return data


@pytest.mark.parametrize("edit", [_weight_marked_use_pickle, _sample_inputs_object], ids=["use_pickle-weight", "sample-inputs"])
def test_a_crafted_pt2_is_refused_by_load_exported_before_anything_runs(tmp_path, edit):
    """torch.export.load runs the pickle of a weight marked use_pickle (and of sample
    inputs weights_only refuses) before it fails; load_exported checks the archive first."""
    from fxprune.export import UnsafeArchiveError, load_exported
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    compact = fxprune.convert(fxprune.prepare(resnet(blocks=1, widths=(4,)).eval(), (x,)).eval())
    paths = save_compact(compact, (x,), tmp_path / "out")
    torch.testing.assert_close(load_exported(paths["pt2"]).module()(x), compact(x), rtol=1e-5, atol=1e-5)
    marker, crafted = tmp_path / "ran", tmp_path / "crafted.pt2"
    _tamper(paths["pt2"], crafted, lambda name, data: edit(name, data, marker))
    with pytest.raises(UnsafeArchiveError, match="crafted.pt2: torch.export.load would unpickle"):
        load_exported(crafted)
    assert not marker.exists()
    with pytest.raises(Exception):  # what the check guards against: torch's own loader runs it
        torch.export.load(crafted)
    assert marker.exists()
