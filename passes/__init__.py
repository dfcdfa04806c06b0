"""The graph passes of fxprune: trace, analyze, residualize, insert gates, compact.

Each module holds one pass with one public entry point and no training logic.
"""

from .analyze import analyze
from .channel_graph import Binding, Branch, ChannelGraph, Group, Read, Rewrite, Space
from .compact import Compact, StripGates
from .insert_gates import CHANNEL_GRAPH, InsertGates
from .residualize import Residualize, residualize
from .trace import TraceError, trace

__all__ = [
    "trace", "TraceError", "analyze", "InsertGates", "Residualize", "residualize", "StripGates", "Compact", "CHANNEL_GRAPH",
    "ChannelGraph", "Space", "Group", "Branch", "Binding", "Read", "Rewrite",
]
