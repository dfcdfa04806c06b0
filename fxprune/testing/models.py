"""Models by name, for the command line, the benchmarks and the sweeps: a torchvision
model name, or ``package.module:attr`` naming a module or a factory."""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

__all__ = ["load_model", "ModelSpecError", "device_of"]


class ModelSpecError(ValueError):
    """A model name that names no model."""


def load_model(spec: str) -> nn.Module:
    """A torchvision model name (built without weights, its backbone's included), or
    ``package.module:attr`` naming a module or a factory."""
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
    builder = torchvision.models.get_model_builder(spec)
    offline = {k: None for k in ("weights", "weights_backbone") if k in inspect.signature(builder).parameters}
    return builder(**offline)  # no weights of any kind: nothing is downloaded


def device_of(name: str) -> torch.device:
    """``torch.device(name)``, or a ``ValueError`` saying why it cannot be used here."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
