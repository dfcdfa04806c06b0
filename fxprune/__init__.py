"""fxprune: train and prune a network at the same time, as passes over torch.fx.

    gated = fxprune.prepare(model, example_inputs, fxprune.PruneConfig(gamma=...))
    pruner = fxprune.Pruner(gated, optimizer)
    for x, y in loader:
        loss = criterion(gated(x), y) + pruner.penalty()
        optimizer.zero_grad(); loss.backward(); optimizer.step(); pruner.step()
    compact = fxprune.convert(gated)

The library is the core (this package's modules) over the graph passes
(``fxprune.passes``); ``fxprune.digits``, ``fxprune.benchmarks``, ``fxprune.report`` and
``fxprune.testing`` are applications and views built on it.
"""

from . import testing
from .api import channel_graph, convert, prepare
from .config import CostReference, PruneConfig
from .distributed import DistributedDataParallel
from .passes import ChannelGraph, RuleHandle, TraceError, analyze, front_end_of, register_rule, residualize, trace
from .pruner import Pruner
from .state import LayerGate, PruneState, UnitGate, state_of

__all__ = [
    "trace", "front_end_of", "analyze", "residualize", "prepare", "convert", "channel_graph", "PruneConfig", "CostReference", "Pruner",
    "ChannelGraph", "TraceError", "PruneState", "UnitGate", "LayerGate", "state_of", "DistributedDataParallel",
    "register_rule", "RuleHandle", "testing",
]
__version__ = "0.1.0"
