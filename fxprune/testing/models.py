"""Models by name, for the command line, the benchmarks and the sweeps: a torchvision
model name, or ``package.module:attr`` naming a module or a factory."""

from __future__ import annotations

import importlib

from torch import nn

__all__ = ["load_model", "ModelSpecError"]


class ModelSpecError(ValueError):
    """A model name that names no model."""


def load_model(spec: str) -> nn.Module:
    """A torchvision model name, or ``package.module:attr`` naming a module or a factory."""
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelSpecError(f"cannot load '{spec}': {exc}") from None
        model = obj if isinstance(obj, nn.Module) else obj()
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"'{spec}' gave a {type(model).__name__}, not an nn.Module")
        return model
    import torchvision

    names = torchvision.models.list_models()
    if spec not in names:
        close = [n for n in names if spec.lower() in n][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelSpecError(f"unknown model '{spec}'{hint}; give a torchvision model name or package.module:factory")
    return torchvision.models.get_model(spec, weights=None)
