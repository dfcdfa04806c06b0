"""Every docstring example of the library runs: the examples in ``fxprune/`` and
``passes/`` are doctests, run on a small model (the digits ResNet, prepared with a
Pruner) that each module gets afresh, so an example that drifts from what the code
does fails here."""

import doctest
import importlib
import pkgutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import fxprune
from fxprune.digits.models import resnet, vgg
from fxprune.state import LayerGate, UnitGate, gate_bank, state_of, theta_of


def _modules() -> list[str]:
    import fxprune.passes

    names = ["fxprune", "fxprune.passes"]
    for info in [*pkgutil.walk_packages(fxprune.__path__, "fxprune."),
                 *pkgutil.walk_packages(fxprune.passes.__path__, "fxprune.passes.")]:
        if not info.name.endswith("__main__"):  # running it is the CLI
            names.append(info.name)
    return sorted(names)


def _with_examples() -> list[str]:
    out = []
    for name in _modules():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an optional extra missing: reported, not skipped silently
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name} needs {exc.name}")))
            continue
        if doctest.DocTestFinder(exclude_empty=True).find(module, name, module=module):
            if any(t.examples for t in doctest.DocTestFinder().find(module, name, module=module)):
                out.append(name)
    return out


def namespace(tmp_path) -> dict:
    """What the examples may use without defining it: a model, its inputs, the gated model,
    its optimizer and Pruner, a config, and a folder to write to."""
    torch.manual_seed(0)
    model, x, y = resnet(), torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    config = fxprune.PruneConfig(total_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = fxprune.prepare(model, (x,), config)
    optimizer = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
    pruner = fxprune.Pruner(gated, optimizer)
    return {"torch": torch, "nn": nn, "F": F, "fx": fx, "np": np, "torchvision": torchvision, "fxprune": fxprune,
            "model": model, "x": x, "y": y, "config": config, "gated": gated, "optimizer": optimizer,
            "pruner": pruner, "make_model": resnet, "vgg": vgg, "state_of": state_of, "gate_bank": gate_bank,
            "theta_of": theta_of, "UnitGate": UnitGate, "LayerGate": LayerGate, "tmp": tmp_path}


MODULES = _with_examples()


def test_the_examples_are_found():
    assert {"fxprune.passes.analysis", "fxprune.passes.errors", "fxprune.api", "fxprune.live_compaction"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module, name, module=module, extraglobs=namespace(tmp_path))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in tests:
        if not test.examples:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert attempted, f"{name} has no example that ran"
    assert not failed, "".join(report)
