"""The graph passes of fxprune: trace, analyze, residualize, insert gates, compact.

Each module holds one pass or one shared piece (the op-class table, the ChannelGraph
contract, the size arguments of shape ops, module surgery); none knows the learning
method, and nothing here imports the ``fxprune`` core.
"""

from .analysis import analyze
from .channel_graph import Binding, Branch, ChannelGraph, Group, Param, Read, Rewrite, Space
from .compact import Compact, CompactionError, plan_slices, rewrite_graph
from .insert_gates import InsertGates, StripGates
from .residualize import Residualize, residualize
from .rules import RuleHandle, register_rule
from .shape_prop import AdaptiveShapeProp, propagate_shapes
from .trace import TraceError, front_end_of, trace

__all__ = [
    "trace", "TraceError", "front_end_of", "propagate_shapes", "AdaptiveShapeProp", "analyze", "InsertGates", "StripGates",
    "Residualize", "residualize", "Compact", "CompactionError", "plan_slices", "rewrite_graph",
    "register_rule", "RuleHandle", "ChannelGraph", "Space", "Group", "Branch", "Binding", "Read", "Rewrite", "Param",
]
