"""The example scripts run as a user would run them (short settings), from a scratch folder."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

RUNS = {
    "prune_while_training.py": ["--epochs", "2"],
    "layer_pruning_vgg.py": ["--epochs", "1"],
    "inspect_model.py": [],
    "prune_transformer.py": ["--epochs", "2"],
    "prune_llama.py": ["--steps", "40", "--out", "out"],
}


@pytest.mark.parametrize("script", list(RUNS))
def test_example_runs(tmp_path, script):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *RUNS[script]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
    if script == "inspect_model.py":
        assert (tmp_path / "out" / "resnet50_gates.png").is_file()
    if script == "prune_llama.py":  # a stock checkpoint, reloaded equal to the compact model
        assert (tmp_path / "out" / "config.json").is_file()
        gap = float(done.stdout.split("logits within ")[1].split()[0])
        assert gap <= 1e-4, done.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_help_is_whole_and_runs_nothing(tmp_path, script):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"python examples/{script}" in done.stdout  # the usage line of the docstring, not a cut sentence
    assert not list(tmp_path.iterdir())  # --help wrote nothing
