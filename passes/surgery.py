"""Small operations on modules and tensors that the rewriting passes share.

* :func:`index_tensor` and :func:`set_data`: a tensor kept at some indices, and swapping a
  parameter's data in place (the same ``Parameter`` object, so an optimizer holding it
  keeps working);
* :func:`refresh_module`: re-derive a layer's size attributes from its sliced tensors;
* :func:`skeleton` and :func:`replace_tensor`: a copy of a module tree that shares
  nothing mutable with the original except tensors, and putting new tensors into it
  (``convert`` builds the compact model this way instead of deep-copying the gated one);
* :func:`reached_tensors` and :func:`delete_unreferenced`: what the graph still uses;
* :func:`copy_graph`: a graph copied whole, its output and code generation included.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import fx, nn

from .op_classes import (
    CHANNEL_NORM,
    CONV,
    CONV_TRANSPOSE,
    GROUP_NORM,
    INPLACE_OPERATORS,
    LINEAR,
    TRAILING_NORM,
    mutates,
)

__all__ = [
    "index_tensor", "set_data", "refresh_module", "skeleton", "copy_module", "replace_tensor", "reached_tensors",
    "delete_unreferenced", "out_of_place", "writes_first_input", "is_impure", "copy_graph",
]


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` to rewrite: every node, the output, and the code generation (a
    graph that returns a typed output, :class:`fxprune.passes.reload.TypedOutput`, stays typed)."""
    new = fx.Graph()
    new.set_codegen(copy.deepcopy(graph._codegen))
    new.output(new.graph_copy(graph, {}))
    return new


def index_tensor(t: torch.Tensor, slices: Iterable[tuple[int, np.ndarray]]) -> torch.Tensor:
    """A new contiguous tensor holding ``t`` at indices ``idx`` of each ``(dim, idx)``.
    Two leading dims (a weight's output and input channels) are gathered in one go, so
    no intermediate copy is made."""
    slices = sorted(slices, key=lambda s: s[0])
    out = t.detach()
    index = [torch.as_tensor(idx, dtype=torch.long, device=t.device) for _, idx in slices]
    if [d for d, _ in slices] == [0, 1]:
        return out[index[0][:, None], index[1][None, :]].contiguous()
    for (dim, _), idx in zip(slices, index):
        out = out.index_select(dim, idx)
    return out.contiguous()


def set_data(t: torch.Tensor, new: torch.Tensor) -> None:
    """Give ``t`` (a parameter or buffer) the data ``new``, in place: ``t`` stays the
    same object."""
    if t.requires_grad and new.shape != t.shape:
        # Autograd caches a parameter's gradient accumulator with its old shape, and a
        # graph still alive (the last step's loss) keeps that cache; assigning data of
        # another dtype first is the supported way to make autograd drop it.
        t.data = torch.empty(0, dtype=torch.float64 if t.dtype != torch.float64 else torch.float32, device=t.device)
    t.data = new


def refresh_module(m: nn.Module, depthwise: bool = False) -> None:
    """Re-derive a layer's size attributes from its (sliced) parameters. A depthwise
    convolution (as the analysis found it; a grouped one pruned to one input channel per
    group looks the same, but keeps its ``groups``) has one group per input channel."""
    if isinstance(m, CONV + CONV_TRANSPOSE):
        w = m.weight
        if m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        else:
            if depthwise:
                mult = m.out_channels // m.groups
                m.groups = w.shape[0] // mult
                m.in_channels = m.groups
            else:
                m.in_channels = w.shape[1] * m.groups
            m.out_channels = w.shape[0]
    elif isinstance(m, LINEAR):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, GROUP_NORM) and m.weight is not None:
        m.num_channels = m.weight.shape[0]
    elif isinstance(m, TRAILING_NORM) and m.weight is not None:
        m.normalized_shape = (m.weight.shape[0],)
    elif isinstance(m, CHANNEL_NORM):
        t = m.weight if m.weight is not None else m.running_mean
        if t is not None:
            m.num_features = t.shape[0]


def skeleton(m: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of the module tree ``m``: every module is a shallow copy with its own
    parameter, buffer and child dicts, so attributes and tensors can be replaced in the
    copy without touching ``m``; the tensors themselves are still shared (replace them
    with :func:`replace_tensor`). A module used twice is copied once."""
    memo = {} if memo is None else memo
    if id(m) in memo:
        return memo[id(m)]
    new = object.__new__(type(m))  # not copy.copy: parametrized modules refuse the copy protocol
    new.__dict__ = dict(m.__dict__)
    memo[id(m)] = new
    new._parameters = dict(m._parameters)
    new._buffers = dict(m._buffers)
    new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    new._modules = {k: None if c is None else skeleton(c, memo) for k, c in m._modules.items()}
    return new


def copy_module(m: nn.Module) -> nn.Module:
    """An independent copy of ``m``: :func:`skeleton` with every parameter and buffer
    cloned (tied tensors stay tied). For modules ``copy.deepcopy`` refuses (parametrized
    ones); other attributes are shared, as in a shallow copy."""
    new = skeleton(m)
    clones: dict[int, torch.Tensor] = {}
    for name, t in [*new.named_parameters(remove_duplicate=False), *new.named_buffers(remove_duplicate=False)]:
        if id(t) not in clones:
            clones[id(t)] = nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(t, nn.Parameter) \
                else t.detach().clone()
        replace_tensor(new, name, clones[id(t)])
    return new


def replace_tensor(root: nn.Module, name: str, new: torch.Tensor) -> None:
    """Put ``new`` in place of the parameter or buffer ``name`` of ``root`` (a Parameter
    stays a Parameter, with the same ``requires_grad``)."""
    owner, _, attr = name.rpartition(".")
    m = root.get_submodule(owner) if owner else root
    if attr in m._parameters:
        old = m._parameters[attr]
        m._parameters[attr] = new if isinstance(new, nn.Parameter) else nn.Parameter(new, requires_grad=old.requires_grad)
    elif attr in m._buffers:
        m._buffers[attr] = new
    else:
        raise KeyError(f"'{name}' is not a parameter or buffer")


def reached_tensors(gm: fx.GraphModule, nodes: Iterable[fx.Node] | None = None) -> set[str]:
    """Names of the parameters and buffers that the ``call_module`` and ``get_attr`` nodes
    among ``nodes`` (default: the whole graph) reach."""
    nodes = list(gm.graph.nodes) if nodes is None else list(nodes)
    owners = {n.target for n in nodes if n.op in ("call_module", "get_attr")}
    out = set()
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        parts = name.split(".")
        if any(".".join(parts[:k]) in owners for k in range(1, len(parts) + 1)):
            out.add(name)
    return out


def delete_unreferenced(gm: fx.GraphModule) -> list[str]:
    """Delete the parameters and buffers no node reaches, then the submodules no node
    uses; returns the tensor names deleted."""
    reached = reached_tensors(gm)
    gone = []
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name not in reached:
            owner, _, attr = name.rpartition(".")
            m = gm.get_submodule(owner) if owner else gm
            if hasattr(m, attr):
                delattr(m, attr)
            gone.append(name)
    gm.delete_all_unused_submodules()
    return gone


def out_of_place(modules: dict[str, nn.Module], node: fx.Node, stream: fx.Node) -> nn.Module | None:
    """``node`` now reads ``stream`` where it read a fresh add result: an in-place op there
    would overwrite a tensor others (and autograd) still hold, so make it out-of-place.
    Returns the module whose ``inplace`` flag was cleared, if any."""
    if node.op == "call_module":
        m = modules[node.target]
        if getattr(m, "inplace", False):
            m.inplace = False
            return m
    elif node.op == "call_function":
        if node.target in INPLACE_OPERATORS and node.args and node.args[0] is stream:
            node.target = INPLACE_OPERATORS[node.target]
        elif node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method" and node.target.endswith("_") and hasattr(torch.Tensor, node.target[:-1]):
        node.target = node.target[:-1]
    return None


def writes_first_input(modules: dict[str, nn.Module], node: fx.Node, x: fx.Node) -> bool:
    """``node`` writes into ``x``, its first input, in place (``x += y``, ``x.add_(1)``,
    ``F.relu(x, inplace=True)``, an ``nn.ReLU(inplace=True)``)."""
    if not node.args or node.args[0] is not x:
        return False
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    return mutates(node) and node.op in ("call_function", "call_method")


def is_impure(modules: dict[str, nn.Module]):
    """A dead-code predicate that works on a graph not yet owned by a module."""

    def impure(n: fx.Node) -> bool:
        if n.op in ("placeholder", "output"):
            return True
        if n.op == "call_module":
            return bool(getattr(modules.get(n.target), "_is_impure", False))
        return mutates(n)

    return impure
