"""Save the compact model in formats that load without fxprune.

``save_compact(compact, example_inputs, folder)`` writes

* ``folder/model.pt2``: ``torch.export.save`` of the model (its batch dim dynamic), loaded
  with ``torch.export.load("model.pt2").module()``;
* ``folder/compact_model/``: the model as Python source plus its state dict, rebuilt with
  ``sys.path.insert(0, folder); from compact_model import CompactModel; m = CompactModel()``.
  Every module is built by its constructor, written out from its repr and checked to
  rebuild the same module, and the weights are read from ``compact_model/state_dict.pt``
  with ``torch.load(..., weights_only=True)``: loading the package runs no pickle (unlike
  ``GraphModule.to_folder``, which pickles every module it cannot write, weights and all,
  and loads them with ``weights_only=False``). The package is checked: it is imported and
  run on the example, and must give the compact model's outputs.

Both are written into a temporary folder beside them and renamed into place, so a failure
leaves no partial ``model.pt2`` or package.

``load_exported(path)`` loads a ``.pt2`` after checking that loading it runs no pickle:
``torch.export.load`` unpickles weights and constants marked ``use_pickle``, custom
objects, and sample inputs that ``weights_only=True`` refuses; such a file is refused,
named, before ``torch.export.load`` sees it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export.pt2_archive import constants as _pt2
from torch.fx.graph import _custom_builtins

from .files import writable
from .passes.errors import exception_line
from .passes.reload import TypedOutput

__all__ = ["save_compact", "load_exported", "UnsafeArchiveError", "PT2", "PACKAGE", "CLASS", "PackageError"]

PT2, PACKAGE, CLASS = "model.pt2", "compact_model", "CompactModel"


class PackageError(ValueError):
    """The compact model cannot be written as a package that loads without pickles."""


class UnsafeArchiveError(ValueError):
    """A ``.pt2`` file that ``torch.export.load`` would unpickle (run code from) in part."""


def _pickled_entries(archive: zipfile.ZipFile) -> list[str]:
    """What ``torch.export.load`` would unpickle in ``archive``: weights and constants
    marked ``use_pickle`` or stored as objects, and sample inputs that are more than
    tensors and containers (``weights_only=True`` refuses them, then torch retries
    without it)."""
    found = []
    for name in archive.namelist():
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            config = json.loads(archive.read(name)).get("config", {})
            for fqn, meta in config.items():
                path = str(meta.get("path_name", ""))
                if meta.get("use_pickle") or not path.startswith((_pt2.WEIGHT_FILENAME_PREFIX, _pt2.TENSOR_CONSTANT_FILENAME_PREFIX)):
                    found.append(f"{fqn} ({name})")
        elif "/data/sample_inputs/" in f"/{name}":
            try:
                torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except Exception as exc:
                found.append(f"{name} ({type(exc).__name__})")
    return found


def load_exported(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """``torch.export.load(path)``, refused with :class:`UnsafeArchiveError` (nothing run)
    when loading would unpickle part of the file (see :func:`_pickled_entries`): a
    ``model.pt2`` from :func:`save_compact` never does."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            found = _pickled_entries(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a torch.export archive: {exc}") from exc
    if found:
        raise UnsafeArchiveError(
            f"{path}: torch.export.load would unpickle (run code from) {', '.join(found[:5])}"
            f"{'' if len(found) <= 5 else f' and {len(found) - 5} more'}; not loaded. Load it only if you trust "
            "its source, with torch.export.load")
    return torch.export.load(path)


def _rebuilt(module: nn.Module) -> str | None:
    """``torch.nn.X(...)``, the constructor call that rebuilds ``module`` (its repr, for the
    modules of ``torch.nn`` whose repr is their constructor call), or None when the repr
    does not rebuild the same module (the same class, repr and tensor shapes)."""
    cls = type(module)
    if cls.__module__.split(".")[:2] != ["torch", "nn"] or getattr(nn, cls.__name__, None) is not cls:
        return None
    text = f"torch.nn.{module!r}"
    if "\n" in text:
        return None
    try:
        other = eval(text, {"torch": torch, "inf": float("inf")})
    except Exception:
        return None
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if type(other) is not cls or repr(other) != repr(module) or shapes(other) != shapes(module):
        return None
    return text


_TYPED_OUTPUT = '''def typed_output(cls, values):
    module, _, qualname = cls.partition(":")
    return functools.reduce(getattr, qualname.split("."), importlib.import_module(module))(**values)
'''


def _package_source(compact: fx.GraphModule) -> str:
    """``module.py`` of the package: the module tree built by constructors, the tensors held
    outside them registered empty, the state dict loaded without pickles, then the forward."""
    called = {n.target for n in compact.graph.nodes if n.op == "call_module"}
    lines = []
    for name, module in compact.named_modules():
        if not name:
            continue
        if any(True for _ in module.children()) or type(module) is nn.Module:  # a plain holder of modules or tensors
            if name in called:
                raise PackageError(f"module '{name}' ({type(module).__name__}) is called whole and holds submodules: "
                                   "it cannot be rebuilt without pickling it")
            lines.append(f"_put(self, {name!r}, torch.nn.Module())")
            continue
        text = _rebuilt(module)
        if text is None:
            raise PackageError(f"module '{name}' ({type(module).__module__}.{type(module).__name__}) cannot be rebuilt "
                               "from its constructor, so the package would have to pickle it")
        lines.append(f"_put(self, {name!r}, {text})")
    owned = {id(t) for m in compact.modules() if _rebuilt(m) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    for kind, tensors in (("parameter", compact.named_parameters()), ("buffer", compact.named_buffers())):
        for name, t in tensors:
            if id(t) in owned:
                continue
            owner, _, attr = name.rpartition(".")
            where = f"self.get_submodule({owner!r})" if owner else "self"
            empty = f"torch.empty({list(t.shape)}, dtype={t.dtype})"
            value = f"torch.nn.Parameter({empty}, requires_grad={t.requires_grad})" if kind == "parameter" else empty
            lines.append(f"{where}.register_{kind}({attr!r}, {value})")
    imports = "\n".join(sorted({v.import_str for v in _custom_builtins.values()}))
    if isinstance(compact.graph._codegen, TypedOutput):  # the model's own output type, imported by name when called
        imports += "\nimport functools\nimport importlib\n\n\n" + _TYPED_OUTPUT
    body = "\n".join(f"        {line}" for line in lines)
    forward = "\n".join(f"    {line}" if line else line for line in compact.code.strip("\n").splitlines())
    return f"""\
import os

{imports}

_HERE = os.path.dirname(os.path.abspath(__file__))


def _put(root, path, module):
    owner, _, name = path.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, name, module)


class {CLASS}(torch.nn.Module):
    def __init__(self):
        super().__init__()
{body}
        self.load_state_dict(torch.load(os.path.join(_HERE, "state_dict.pt"), weights_only=True))

{forward}
"""


def _write_package(compact: fx.GraphModule, where: Path, example: tuple[Any, ...]) -> Path:
    """Write the package under ``where`` and check it: imported and run on ``example``, it
    gives the compact model's outputs."""
    package = where / PACKAGE
    package.mkdir()
    torch.save(compact.state_dict(), package / "state_dict.pt")
    (package / "module.py").write_text(_package_source(compact))
    (package / "__init__.py").write_text(f"from .module import {CLASS}\n")
    name = f"_fxprune_package_check_{id(package)}"
    spec = importlib.util.spec_from_file_location(name, package / "module.py")
    loaded = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(loaded)
        rebuilt = getattr(loaded, CLASS)().eval()
        with torch.no_grad():
            got, want = rebuilt(*example), compact(*example)
    finally:
        sys.modules.pop(name, None)
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    if len(got) != len(want) or any(isinstance(w, torch.Tensor) and not torch.allclose(g, w, rtol=1e-5, atol=1e-6)
                                    for g, w in zip(got, want)):
        raise PackageError("the written package does not compute what the compact model computes on the example; "
                           "please report it, with the model")
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
    staging = Path(tempfile.mkdtemp(prefix=".fxprune-save-", dir=folder))
    try:
        try:
            program = torch.export.export(compact, example, dynamic_shapes=dynamic_shapes)
        except Exception as exc:
            raise ValueError(
                f"torch.export could not export the compact model with dynamic_shapes={dynamic_shapes!r}: "
                f"{exception_line(exc)}. If the model fixes its batch "
                "size, pass dynamic_shapes=None") from exc
        torch.export.save(program, staging / PT2)
        _write_package(compact, staging, example)
        os.replace(staging / PT2, folder / PT2)  # both complete: into place
        if (folder / PACKAGE).exists():
            shutil.rmtree(folder / PACKAGE)
        os.replace(staging / PACKAGE, folder / PACKAGE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        compact.train(was)
    package = folder / PACKAGE
    return {"pt2": folder / PT2, "package": package, "state_dict": package / "state_dict.pt"}
