"""fxprune: train and prune a network at the same time, as passes over torch.fx.

    gated = fxprune.prepare(model, example_inputs, fxprune.PruneConfig())
    ...  # train, or set gates
    compact = fxprune.convert(gated)
"""

from . import testing
from .api import channel_graph, convert, prepare
from .config import PruneConfig
from .passes import ChannelGraph, TraceError, analyze, trace

__all__ = ["trace", "analyze", "prepare", "convert", "channel_graph", "PruneConfig", "ChannelGraph", "TraceError", "testing"]
__version__ = "0.1.0"
