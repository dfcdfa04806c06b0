"""Save the compact model in formats that load without fxprune.

``save_compact(compact, example_inputs, folder)`` writes

* ``folder/model.pt2``: ``torch.export.save`` of the model (its batch dim dynamic), loaded
  with ``torch.export.load("model.pt2").module()``;
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


def _batch_shapes(example: tuple[Any, ...], batch_dim: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The example with at least two examples (``torch.export`` specialises a size of 1),
    and ``dynamic_shapes`` with one ``Dim`` for the batch dim of every tensor input."""
    batch = torch.export.Dim("batch")
    grown, shapes = [], []
    for t in example:
        if isinstance(t, torch.Tensor) and t.dim() > batch_dim:
            if t.shape[batch_dim] == 1:
                t = torch.cat([t, t], batch_dim)
            shapes.append({batch_dim: batch})
        else:
            shapes.append(None)
        grown.append(t)
    return tuple(grown), tuple(shapes)


def save_compact(compact: fx.GraphModule, example_inputs: tuple[Any, ...] | torch.Tensor, folder: str | os.PathLike,
                 *, batch_dim: int = 0, dynamic_shapes: Any = "batch") -> dict[str, Path]:
    """Write ``compact`` (from :func:`fxprune.convert`) as ``model.pt2`` and as a Python
    package with its state dict under ``folder``; returns the paths.

    ``dynamic_shapes="batch"`` (default) exports the batch dim (``batch_dim`` of every
    tensor input) as dynamic, so the ``.pt2`` runs at any batch size; ``None`` fixes every
    shape to the example's; anything else is handed to ``torch.export.export``."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    folder = writable(folder, "the compact model", folder=True)
    if any(type(m).__module__.startswith("fxprune") for m in compact.modules()):
        raise ValueError("save_compact takes the compact model: call fxprune.convert(gated) first")
    example = tuple(example_inputs)
    if isinstance(dynamic_shapes, str) and dynamic_shapes == "batch":
        example, dynamic_shapes = _batch_shapes(example, batch_dim)
    was = compact.training
    compact.eval()
    try:
        try:
            program = torch.export.export(compact, example, dynamic_shapes=dynamic_shapes)
        except Exception as exc:  # noqa: BLE001 - torch.export's errors are long; the first line and what to do
            raise ValueError(
                f"torch.export could not export the compact model with dynamic_shapes={dynamic_shapes!r}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. If the model fixes its batch "
                "size, pass dynamic_shapes=None") from exc
        torch.export.save(program, folder / PT2)
        package = _to_folder(compact, folder)
    finally:
        compact.train(was)
    return {"pt2": folder / PT2, "package": package, "state_dict": package / "state_dict.pt"}
