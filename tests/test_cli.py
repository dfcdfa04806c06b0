"""The fxprune command: exit codes, tables and bad-input messages."""

import pytest

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


def test_demo_with_an_unwritable_output_fails_before_training(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "a-file" / "demo")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the demo's outputs" in err and "choose a writable path" in err


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path / "demo"), "--no-compile", "--batch", "32"]) == 0
    out = capsys.readouterr().out
    for row in ("test accuracy %", "parameters", "FLOPs per image", "residual blocks", "stage 3 widths",
                "training FLOPs", "eager", "cost per layer", "| total"):
        assert row in out
    assert (tmp_path / "demo" / "model.pt2").is_file() and (tmp_path / "demo" / "gates.png").is_file()
    assert (tmp_path / "demo" / "cost_per_layer.png").is_file()
    assert (tmp_path / "demo" / "compact_model" / "state_dict.pt").is_file()


def test_unknown_command_options_exit_2(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", "many"])
    assert exc.value.code == 2 and "invalid int value" in capsys.readouterr().err


def test_bench_latency_prints_ratios(capsys):
    assert main(["bench", "latency", "--model", "resnet18", "--batch", "2", "--size", "64", "--mode", "none",
                 "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "latency / FLOPs ratio" in out and "| eager" in out and "keep 0.5" in out


def test_zoo_takes_its_own_options(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["zoo", "--help"])
    assert exc.value.code == 0 and "--models" in capsys.readouterr().out
    assert main(["zoo", "--models", "squeezenet1_1"]) == 0
    assert "1/1 models equivalent" in capsys.readouterr().out


def test_bench_lists_the_benchmarks_and_a_missing_device_is_one_line(capsys):
    assert main(["bench", "--help"]) == 0
    assert "step" in capsys.readouterr().out
    assert main(["bench", "latency", "--device", "cuda:7", "--model", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxprune: error: --device cuda:7:") and len(err.splitlines()) == 1


def test_models_that_default_to_backbone_weights_are_built_without_any(monkeypatch):
    import urllib.request

    from fxprune.testing.models import load_model

    def refuse(*args, **kwargs):
        raise AssertionError("no download may be attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert sum(p.numel() for p in load_model("fasterrcnn_mobilenet_v3_large_fpn").parameters()) > 0


def test_an_untraceable_model_is_a_one_line_error(capsys):
    assert main(["inspect", "fasterrcnn_mobilenet_v3_large_fpn", "--input-shape", "1,3,64,64"]) == 2
    assert "cannot trace module 'FasterRCNN'" in capsys.readouterr().err


def test_inspect_says_which_front_end_traced_the_model_and_why(capsys):
    assert main(["inspect", "wrapped_ops:UsesWrapped", "--input-shape", "3,4"]) == 0
    out = capsys.readouterr().out
    assert "traced by export (symbolic tracing kept scaled_mix whole;" in out
    assert main(["inspect", "wrapped_ops:UsesWrapped", "--input-shape", "3,4", "--front-end", "symbolic"]) == 0
    assert "traced by symbolic" in capsys.readouterr().out


def test_bench_defaults_prints_one_grid_with_the_from_scratch_control_and_meets_its_budgets(capsys):
    assert main(["bench", "defaults", "--quick", "--tasks", "MLP / wine", "--optimizers", "adam", "--only", "grid", "budgets"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header, row = [c.strip() for c in table[0].split("|")[1:-1]], [c.strip() for c in table[2].split("|")[1:-1]]
    assert len(table) == 3 and row[:2] == ["MLP / wine", "adam"]
    assert "its widths from scratch (vs dense)" in header and "target_flops=0.1: FLOPs" in header
    assert float(row[header.index("FLOPs fraction")]) == pytest.approx(0.5, rel=0.1)
    for f in (0.25, 0.1):
        assert float(row[header.index(f"target_flops={f:g}: FLOPs")]) == pytest.approx(f, rel=0.1)
    assert row[header.index("undecided %")] == "0"


def test_bench_real_prints_each_cell_against_dense_torch_pruning_and_its_shape_from_scratch(capsys):
    """torchvision's resnet18 in the quick mode (12 steps): every column is measured, none
    skipped, and the budget of PruneConfig(total_steps) is met."""
    assert main(["bench", "real", "--quick", "--models", "resnet18", "--optimizers", "sgd"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header, row = [c.strip() for c in table[0].split("|")[1:-1]], [c.strip() for c in table[2].split("|")[1:-1]]
    assert len(table) == 3 and row[:3] == ["resnet18", "sgd", "12"]
    for column in ("PruneConfig(total_steps): (vs dense)", "Torch-Pruning + fine-tune", "its shape from scratch"):
        assert not row[header.index(column)].startswith("not run"), (column, row[header.index(column)])
    assert float(row[header.index("FLOPs fraction")]) == pytest.approx(0.5, rel=0.1)
    assert float(row[header.index("training FLOPs")]) < 1.0
