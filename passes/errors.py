"""The one-line form of an exception that fxprune puts into its own error messages and
reports: the exception's type and the first line of its message (torch.export and
Dynamo errors run to pages), safe on an empty message.

    >>> exception_line(ValueError("bad shape\\nmore detail"))
    'ValueError: bad shape'
    >>> exception_line(RuntimeError())
    'RuntimeError'
    >>> exception_line(KeyError("x"), with_type=False, limit=2)
    "'x"
"""

from __future__ import annotations

__all__ = ["exception_line"]


def exception_line(exc: BaseException, *, with_type: bool = True, limit: int | None = None) -> str:
    """``"Type: first line of the message"`` (``with_type=False``: the line alone), cut to
    ``limit`` characters when given."""
    text = str(exc)
    line = text.splitlines()[0] if text.strip() else ""
    if with_type:
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if limit is None else line[:limit]
