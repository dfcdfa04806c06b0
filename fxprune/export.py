"""Save the compact model in formats that load without fxprune.

``save_compact(compact, example_inputs, folder)`` writes

* ``folder/model.pt2``: ``torch.export.save`` of the model, loaded with
  ``torch.export.load("model.pt2").module()``;
* ``folder/compact_model/``: the model as Python source plus its state dict
  (``torch.fx.GraphModule.to_folder``), rebuilt with
  ``sys.path.insert(0, folder); from compact_model import CompactModel; m = CompactModel()``.
  ``compact_model/state_dict.pt`` is the plain state dict.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .files import writable

__all__ = ["save_compact", "PT2", "PACKAGE", "CLASS"]

PT2, PACKAGE, CLASS = "model.pt2", "compact_model", "CompactModel"

_HEADER = "import os\n_HERE = os.path.dirname(os.path.abspath(__file__))\n"


def _to_folder(compact: fx.GraphModule, folder: Path) -> Path:
    """``GraphModule.to_folder``, with the absolute paths it writes made relative to the
    package, so the folder can be moved or shipped."""
    package = folder / PACKAGE
    with warnings.catch_warnings():
        # containers without a repr are pickled next to module.py: plain torch modules, loadable as they are
        warnings.filterwarnings("ignore", message="Was not able to save the following children modules as reprs")
        compact.to_folder(package, CLASS)
    source = package / "module.py"
    text = source.read_text()
    text = re.sub(r"r'" + re.escape(str(package)) + r"/([^']*)'", r"os.path.join(_HERE, r'\1')", text)
    if str(package) in text:
        raise RuntimeError(f"could not make the paths in '{source}' relative; please report this model")
    source.write_text(_HEADER + text)
    return package


def save_compact(compact: fx.GraphModule, example_inputs: tuple[Any, ...] | torch.Tensor, folder: str | os.PathLike) -> dict[str, Path]:
    """Write ``compact`` (from :func:`fxprune.convert`) as ``model.pt2`` and as a Python
    package with its state dict under ``folder``; returns the paths."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    folder = writable(folder, "the compact model", folder=True)
    if any(type(m).__module__.startswith("fxprune") for m in compact.modules()):
        raise ValueError("save_compact takes the compact model: call fxprune.convert(gated) first")
    was = compact.training
    compact.eval()
    try:
        program = torch.export.export(compact, tuple(example_inputs))
        torch.export.save(program, folder / PT2)
        package = _to_folder(compact, folder)
    finally:
        compact.train(was)
    return {"pt2": folder / PT2, "package": package, "state_dict": package / "state_dict.pt"}
