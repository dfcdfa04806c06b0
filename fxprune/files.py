"""Output paths: fail before the work, with the path and what to do, not after it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["writable"]


def writable(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """``path`` as a Path once it is sure ``what`` can be written there; ``folder=True``
    makes ``path`` itself the (created) folder. Raises ``OSError`` naming the path otherwise."""
    path = Path(path)
    parent = path if folder else path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot write {what} to '{path}': cannot create '{parent}' ({exc.strerror or exc}); "
                      "choose a writable path") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not folder and not os.access(path, os.W_OK)):
        raise OSError(f"cannot write {what} to '{path}': '{parent}' is not writable; choose a writable path")
    if not folder and path.is_dir():
        raise OSError(f"cannot write {what} to '{path}': it is a folder; give a file name")
    return path
