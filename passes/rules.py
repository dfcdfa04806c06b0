"""Rules users register for their own modules, functions and methods: what the op does to
channel spaces, which the dependency analysis then applies (:mod:`.analysis.dispatch`).

A rule is ``rule(builder, node) -> {dim: space}`` (or a list of those for ops returning
several tensors), the same signature as the built-in rules in :mod:`.analysis.generic`
and :mod:`.analysis.layers`, which it may call::

    from fxprune.passes import register_rule
    from fxprune.passes.analysis.generic import passthrough

    handle = register_rule(MyActivation, passthrough)   # channels pass through unchanged
    ...
    handle.remove()                                     # back to the rule before (if any)

A module class registered here is a leaf of symbolic tracing (its forward is not traced
into; the rule says what it does), and its rule wins over the built-in ones for it and its
subclasses. A function is matched where it is a ``call_function`` node: a torch op, or a
Python function that ``torch.fx.wrap`` keeps whole. A string names a tensor method. A
registration lasts until its handle's ``remove()``: library code registers nothing for
the user.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register_rule", "RuleHandle", "registered_module_rule", "registered_function_rule",
           "registered_method_rule", "is_registered_module"]

_MODULES: dict[type, Callable[..., Any]] = {}
_FUNCTIONS: dict[Any, Callable[..., Any]] = {}
_METHODS: dict[str, Callable[..., Any]] = {}


class RuleHandle:
    """What :func:`register_rule` returns: ``remove()`` undoes the registration (restoring
    the rule registered before it for the same target, if any)."""

    def __init__(self, table: dict, key: Any, previous: Callable[..., Any] | None) -> None:
        self._table, self._key, self._previous, self._removed = table, key, previous, False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        if self._previous is None:
            self._table.pop(self._key, None)
        else:
            self._table[self._key] = self._previous

    def __enter__(self) -> RuleHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_rule(target: type | Callable[..., Any] | str, rule: Callable[..., Any]) -> RuleHandle:
    """Register ``rule`` for ``target``: an ``nn.Module`` subclass, a function (a
    ``call_function`` target) or a tensor method's name. Returns a :class:`RuleHandle`
    (also a context manager) whose ``remove()`` undoes it."""
    if not callable(rule):
        raise TypeError(f"register_rule({target!r}, ...): the rule must be a callable rule(builder, node) -> "
                        f"{{dim: space}}, not {type(rule).__name__}")
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register_rule: {target.__name__} is a class but not an nn.Module subclass; register a "
                            "module class, a function, or a tensor method's name")
        table: dict = _MODULES
    elif isinstance(target, str):
        if not target.isidentifier():
            raise ValueError(f"register_rule: {target!r} is not a tensor method's name")
        table = _METHODS
    elif callable(target):
        table = _FUNCTIONS
    else:
        raise TypeError(f"register_rule: cannot register a rule for {target!r} ({type(target).__name__}); register a "
                        "module class, a function, or a tensor method's name")
    previous = table.get(target)
    table[target] = rule
    return RuleHandle(table, target, previous)


def registered_module_rule(module: nn.Module) -> Callable[..., Any] | None:
    """The rule registered for ``module``'s class or the nearest of its bases, or None."""
    for cls in type(module).__mro__:
        if cls in _MODULES:
            return _MODULES[cls]
    return None


def is_registered_module(module: nn.Module) -> bool:
    return registered_module_rule(module) is not None


def registered_function_rule(fn: Any) -> Callable[..., Any] | None:
    try:
        return _FUNCTIONS.get(fn)
    except TypeError:  # an unhashable target
        return None


def registered_method_rule(name: str) -> Callable[..., Any] | None:
    return _METHODS.get(name)
