"""fxprune: train and prune a network at the same time, as passes over torch.fx.

    gated = fxprune.prepare(model, example_inputs, fxprune.PruneConfig(gamma=...))
    pruner = fxprune.Pruner(gated, optimizer)
    for x, y in loader:
        loss = criterion(gated(x), y) + pruner.penalty()
        optimizer.zero_grad(); loss.backward(); optimizer.step(); pruner.step()
    compact = fxprune.convert(gated)
"""

from . import testing
from .api import channel_graph, convert, prepare
from .config import CostReference, PruneConfig
from .passes import ChannelGraph, TraceError, analyze, residualize, trace
from .pruner import Pruner

__all__ = [
    "trace", "analyze", "residualize", "prepare", "convert", "channel_graph", "PruneConfig", "CostReference", "Pruner", "ChannelGraph", "TraceError",
    "testing",
]
__version__ = "0.1.0"
