"""The fxprune command: exit codes, tables and bad-input messages."""

from fxprune.cli import main


def test_inspect_prints_groups_and_branches(capsys):
    assert main(["inspect", "resnet18", "--input-shape", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "prunable" in out and "frozen: model output" in out
    assert "layer1.0.conv1" in out and "branch" in out


def test_inspect_accepts_a_factory_path(capsys):
    assert main(["inspect", "torchvision.models:mobilenet_v2", "--input-shape", "1,3,32,32"]) == 0
    assert "residual branches" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["inspect", "resnet1"]) == 2
    assert "unknown model 'resnet1'" in capsys.readouterr().err


def test_wrong_input_shape_is_a_clear_error(capsys):
    assert main(["inspect", "resnet18", "--input-shape", "1,5,64,64"]) == 2
    assert "example input" in capsys.readouterr().err
