"""The second front end: ``torch.export``'s training IR, as a graph the rest of the pipeline reads.

Symbolic tracing refuses a forward that branches on a shape or a value
(``if H != self.img_size: ...``, ``for i in range(x.shape[1])``); ``torch.export``
(non-strict, the training IR that PT2E quantization-aware training uses) runs the
forward on fake tensors and records the ATen ops it reaches, with the batch size and
sequence length kept symbolic where the model allows it. :func:`export_trace` turns that ATen graph into a
``GraphModule`` over the model's own parameters:

* every ATen op of :data:`ATEN_RULES` is written as the torch call it stands for
  (``aten.linear`` -> ``F.linear``, ``aten.view`` -> ``x.view(sizes)``, ``aten.select`` /
  ``aten.slice`` -> indexing, ``aten.sym_size`` -> ``x.size(d)``), so the ATen graph is
  analysed by the same rules as a symbolic trace: one rule table, two front ends;
* a ``linear``/``conv``/``batch_norm``/``layer_norm``/``group_norm``/``embedding`` call
  whose parameters are those of one module of that exact class, called as that module
  calls it, becomes a ``call_module`` of it again (BatchNorm follows ``train()``/``eval()``,
  gates and compaction treat it as a module);
* parameters and buffers are read with ``get_attr`` (same names as in the model), lifted
  constants become buffers of the graph module;
* an ATen op without a rule stays as it is: it runs, and the analysis freezes every
  channel it touches, naming it.

The result computes what the model computes (checked on the example inputs by
:func:`fxprune.passes.trace.trace`). Not covered: inputs or outputs nested in containers
other than tuples/lists/dicts of tensors, and models that mutate buffers other than
BatchNorm's running statistics.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from .reload import TypedOutput
from .tracer import TraceError, as_call, reason

__all__ = ["export_trace", "ATEN_RULES", "FRONT_END_META"]

#: ``gm.meta`` key: ``(front end, why)``, ``"symbolic"`` or ``"export"``
FRONT_END_META = "fxprune_front_end"

aten = torch.ops.aten
_BIG = 2 ** 62  # aten.slice's "to the end"

Write = Callable[[fx.Graph, tuple, dict], fx.Node]


def _call(fn: Any, keep: int | None = None, names: tuple[str, ...] = ()) -> Write:
    """``fn(*args[:keep], **kwargs)``; trailing positional args become the ``names`` keywords."""
    def write(g: fx.Graph, args: tuple, kwargs: dict) -> fx.Node:
        head = args[:keep] if keep is not None else args
        extra = dict(zip(names, args[len(head):]))
        return g.call_function(fn, tuple(head), {**extra, **kwargs})
    return write


def _method(name: str) -> Write:
    return lambda g, args, kwargs: g.call_method(name, args, kwargs)


def _index(dim_pos: int, make: Callable[..., Any]) -> Write:
    """``aten.select(x, dim, i)`` / ``aten.slice(x, dim, start, end, step)`` as ``x[..., item]``."""
    def write(g: fx.Graph, args: tuple, kwargs: dict) -> fx.Node:
        x, dim, rest = args[0], args[dim_pos] if len(args) > dim_pos else 0, args[dim_pos + 1:]
        if dim < 0:
            dim += x.meta["val"].dim()
        return g.call_function(operator.getitem, (x, (slice(None),) * dim + (make(*rest),)))
    return write


def _slice(start: Any = None, end: Any = None, step: Any = 1) -> slice:
    return slice(start, None if isinstance(end, int) and end >= _BIG else end, step)


def _batch_norm(g: fx.Graph, args: tuple, kwargs: dict) -> fx.Node:
    x, w, b, mean, var, training, momentum, eps = args[:8]
    return g.call_function(F.batch_norm, (x, mean, var, w, b, training, momentum, eps))


def _embedding(g: fx.Graph, args: tuple, kwargs: dict) -> fx.Node:
    weight, indices = args[:2]
    padding_idx = args[2] if len(args) > 2 and args[2] >= 0 else None
    return g.call_function(F.embedding, (indices, weight, padding_idx))


def _to_dtype_layout(g: fx.Graph, args: tuple, kwargs: dict) -> fx.Node:
    """``aten.to.dtype_layout`` (``x.to(dtype=..., device=...)``) as ``x.to(...)`` when it only
    casts or moves a strided tensor; otherwise left as the ATen call."""
    if kwargs.get("layout") not in (None, torch.strided) or kwargs.get("memory_format") not in (None, torch.preserve_format):
        return g.call_function(aten.to.dtype_layout, args, kwargs)
    keep = {k: v for k, v in kwargs.items() if k in ("dtype", "device", "non_blocking", "copy") and v is not None}
    return g.call_method("to", args, keep)


def _dropout(inplace: bool) -> Write:
    def write(g: fx.Graph, args: tuple, kwargs: dict) -> fx.Node:
        x, p, train = args
        return g.call_function(F.dropout, (x, p, train, inplace))
    return write


_UNARY = {aten.relu: torch.relu, aten.sigmoid: torch.sigmoid, aten.tanh: torch.tanh, aten.silu: F.silu,
          aten.hardswish: F.hardswish, aten.hardsigmoid: F.hardsigmoid, aten.mish: F.mish, aten.exp: torch.exp,
          aten.sqrt: torch.sqrt, aten.rsqrt: torch.rsqrt, aten.neg: torch.neg, aten.abs: torch.abs,
          aten.erf: torch.erf, aten.log: torch.log, aten.clone: torch.clone}
_INPLACE = {aten.relu_: torch.relu_, aten.sigmoid_: torch.sigmoid_, aten.tanh_: torch.tanh_}
_IN_PLACE_BINARY = {aten.add_: operator.iadd, aten.sub_: operator.isub, aten.mul_: operator.imul,
                    aten.div_: operator.itruediv}
_BINARY = {aten.add: torch.add, aten.sub: torch.sub, aten.mul: torch.mul, aten.div: torch.div,
           aten.pow: torch.pow, aten.maximum: torch.maximum, aten.minimum: torch.minimum}

#: ATen overload -> how it is written as a torch call the analysis has a rule for
ATEN_RULES: dict[Any, Write] = {
    aten.linear.default: _call(F.linear), aten.addmm.default: _call(torch.addmm),
    aten.conv1d.default: _call(F.conv1d), aten.conv2d.default: _call(F.conv2d), aten.conv3d.default: _call(F.conv3d),
    aten.batch_norm.default: _batch_norm,
    aten.layer_norm.default: _call(F.layer_norm, 5),
    aten.group_norm.default: _call(F.group_norm, 5),
    aten.rms_norm.default: _call(F.rms_norm),
    aten.embedding.default: _embedding,
    aten.dropout.default: _dropout(False), aten.dropout_.default: _dropout(True),
    **{op.default: _call(fn) for op, fn in {**_UNARY, **_INPLACE}.items()},
    aten.gelu.default: _call(F.gelu), aten.hardtanh.default: _call(F.hardtanh),
    aten.leaky_relu.default: _call(F.leaky_relu), aten.elu.default: _call(F.elu),
    aten.softplus.default: _call(F.softplus),
    aten.silu_.default: lambda g, a, k: g.call_function(F.silu, a, {"inplace": True}),
    aten.hardswish_.default: lambda g, a, k: g.call_function(F.hardswish, a, {"inplace": True}),
    **{getattr(op, o): _call(fn) for op, fn in _BINARY.items()
       for o in ("Tensor", "Scalar", "Tensor_Scalar", "Tensor_Tensor") if hasattr(op, o)},
    **{getattr(op, o): _call(fn, 2) for op, fn in _IN_PLACE_BINARY.items() for o in ("Tensor", "Scalar")
       if hasattr(op, o)},
    aten.clamp.default: _call(torch.clamp), aten.square.default: _call(torch.square),
    aten.clamp_min.default: _call(torch.clamp_min), aten.linalg_vector_norm.default: _call(torch.linalg.vector_norm),
    aten.hardtanh_.default: lambda g, a, k: g.call_function(F.hardtanh, a, {"inplace": True}),
    aten.to.dtype: _method("to"), aten.type_as.default: _method("type_as"),
    aten.to.dtype_layout: lambda g, a, k: _to_dtype_layout(g, a, k),
    aten.matmul.default: _call(torch.matmul), aten.bmm.default: _call(torch.bmm),
    aten.view.default: _method("view"), aten.reshape.default: _call(torch.reshape),
    aten._unsafe_view.default: _call(torch.reshape),
    aten.expand.default: _method("expand"), aten.expand_as.default: _method("expand_as"),
    aten.permute.default: _call(torch.permute), aten.transpose.int: _call(torch.transpose),
    aten.t.default: _call(torch.t),
    aten.flatten.using_ints: _call(torch.flatten), aten.unflatten.int: _call(torch.unflatten),
    aten.unsqueeze.default: _call(torch.unsqueeze), aten.squeeze.dim: _call(torch.squeeze),
    aten.squeeze.dims: _call(torch.squeeze),
    aten.contiguous.default: _method("contiguous"),
    aten.cat.default: _call(torch.cat), aten.stack.default: _call(torch.stack),
    aten.split.Tensor: _call(torch.split), aten.split_with_sizes.default: _call(torch.split),
    aten.chunk.default: _call(torch.chunk), aten.unbind.int: _call(torch.unbind),
    aten.select.int: _index(1, int), aten.slice.Tensor: _index(1, _slice),
    aten.scaled_dot_product_attention.default: _call(
        F.scaled_dot_product_attention, 3, ("attn_mask", "dropout_p", "is_causal")),
    aten.softmax.int: _call(torch.softmax), aten.log_softmax.int: _call(torch.log_softmax),
    aten.mean.dim: _call(torch.mean), aten.mean.default: _call(torch.mean),
    aten.sum.dim_IntList: _call(torch.sum), aten.amax.default: _call(torch.amax),
    aten.adaptive_avg_pool1d.default: _call(F.adaptive_avg_pool1d),
    aten.adaptive_avg_pool2d.default: _call(F.adaptive_avg_pool2d),
    aten.max_pool2d.default: _call(F.max_pool2d), aten.avg_pool2d.default: _call(F.avg_pool2d),
    aten.pad.default: _call(F.pad),
    aten.sym_size.int: _method("size"),
    aten.roll.default: _call(torch.roll),
    aten.alias.default: lambda g, a, k: g.call_function(operator.getitem, (a[0], (Ellipsis,))),  # x[...]: a view
    aten.zero_.default: _method("zero_"), aten.fill_.Scalar: _method("fill_"),
    aten.new_zeros.default: _method("new_zeros"), aten.new_ones.default: _method("new_ones"),
    aten.index.Tensor: lambda g, a, k: g.call_function(
        operator.getitem, (a[0], tuple(slice(None) if i is None else i for i in a[1]))),
}

#: ops that only check or constrain shapes: left out of the graph
_CHECKS = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
           aten._assert_tensor_metadata.default}

# ---------------------------------------------------------------- calls back into modules
_MODULE_CALLS: dict[Any, tuple[type | tuple[type, ...], Callable[[nn.Module, tuple], Any]]] = {
    aten.linear.default: (nn.Linear, lambda m, a: len(a) == 2 or a[2] is not None or m.bias is None),
    aten.conv1d.default: (nn.Conv1d, lambda m, a: _conv_matches(m, a)),
    aten.conv2d.default: (nn.Conv2d, lambda m, a: _conv_matches(m, a)),
    aten.conv3d.default: (nn.Conv3d, lambda m, a: _conv_matches(m, a)),
    aten.batch_norm.default: ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
                              lambda m, a: a[5] == (m.training or m.running_mean is None) and a[7] == m.eps),
    aten.layer_norm.default: (nn.LayerNorm, lambda m, a: tuple(a[1]) == tuple(m.normalized_shape)
                              and (a[4] if len(a) > 4 else 1e-5) == m.eps),
    aten.group_norm.default: (nn.GroupNorm, lambda m, a: a[1] == m.num_groups and (a[4] if len(a) > 4 else 1e-5) == m.eps),
}


def _conv_matches(m: nn.Module, a: tuple) -> bool:
    n = len(m.kernel_size)

    def tup(v: Any, default: int) -> tuple:
        v = default if v is None else v
        return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n

    stride, padding, dilation = (a[i] if len(a) > i else d for i, d in ((3, 1), (4, 0), (5, 1)))
    groups = a[6] if len(a) > 6 else 1
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return False
    return (tup(stride, 1) == tuple(m.stride) and tup(padding, 0) == tuple(m.padding)
            and tup(dilation, 1) == tuple(m.dilation) and groups == m.groups)


def _param_owner(node: Any, names: dict[fx.Node, str], leaf: str) -> str | None:
    """The module path of a ``get_attr`` of ``<path>.<leaf>``."""
    target = names.get(node)
    if target is None or not target.endswith("." + leaf):
        return None
    return target[: -len(leaf) - 1]


def _as_module_call(op: Any, args: tuple, names: dict[fx.Node, str], model: nn.Module) -> str | None:
    """The module whose own ``forward`` this ATen call is, if any."""
    if op not in _MODULE_CALLS:
        return None
    cls, matches = _MODULE_CALLS[op]
    slots = {aten.batch_norm.default: (1, 2, 3, 4), aten.layer_norm.default: (2, 3),
             aten.group_norm.default: (2, 3)}.get(op, (1, 2))
    leaves = {aten.batch_norm.default: ("weight", "bias", "running_mean", "running_var")}.get(op, ("weight", "bias"))
    owners = set()
    for slot, leaf in zip(slots, leaves):
        value = args[slot] if len(args) > slot else None
        if value is None:
            continue
        owner = _param_owner(value, names, leaf)
        if owner is None:
            return None
        owners.add(owner)
    if len(owners) != 1:
        return None
    path = owners.pop()
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return None
    if type(m) not in (cls if isinstance(cls, tuple) else (cls,)) or not matches(m, args):
        return None
    for slot, leaf in zip(slots, leaves):  # every parameter the module has is the one passed
        has = getattr(m, leaf, None) is not None
        passed = len(args) > slot and args[slot] is not None
        if has != passed:
            return None
    return path


# ---------------------------------------------------------------- the front end
def _dynamic_dims(values: list[Any]) -> tuple:
    """The batch dim of every tensor input symbolic where the model allows it
    (``Dim.AUTO``: export specialises a dim the model needs static), and the sequence
    dim (dim 1) of 2-D and 3-D inputs (token ids ``[B, T]``, tokens ``[B, T, C]``): the
    graph then runs on other batch sizes and sequence lengths. Image sizes stay static:
    symbolic H and W cost Swin's export 40 times the time (window padding arithmetic)."""
    def dims(v: torch.Tensor) -> dict[int, Any]:
        return dict.fromkeys(range(min(v.dim(), 2) if v.dim() <= 3 else 1), Dim.AUTO)

    return tuple(dims(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else
                 pytree.tree_map(lambda _: None, v) for v in values)


def export_trace(model: nn.Module, values: list[Any], param_names: list[str]) -> fx.GraphModule:
    """``model`` exported on ``values`` (its forward's arguments in order; the model's
    training flag as it is) and written back as a ``GraphModule`` over its parameters."""
    name = type(model).__name__
    args, kwargs = as_call(model, values)
    dynamic = _dynamic_dims(values)
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dict(zip(kwargs, dynamic)) if kwargs else dynamic,
                                 strict=False)
    except Exception as exc:
        raise TraceError(f"torch.export cannot export '{name}' either: {reason(exc)}") from exc
    sig = ep.graph_signature
    specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    graph, env, attrs, names = fx.Graph(), {}, {}, {}
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    user = iter(zip(param_names, values))
    defaulted = False
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            spec = specs.get(n.name)
            if spec is None or spec.kind == InputKind.USER_INPUT:
                pname, value = next(user)
                if isinstance(value, torch.Tensor):
                    # after a parameter with a default every one needs one: a tensor's is None (give it)
                    env[n] = graph.placeholder(pname, default_value=None) if defaulted else graph.placeholder(pname)
                else:  # specialised to its value, as symbolic tracing does; the call keeps its arity
                    graph.placeholder(pname, default_value=value)
                    env[n] = value
                    defaulted = True
                continue
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                attrs[spec.target] = state[spec.target]
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                attrs[spec.target] = ep.constants[spec.target]
            else:
                raise TraceError(f"'{name}' exports with a {spec.kind.name} input ('{n.name}'), which fxprune does not read")
            env[n] = graph.get_attr(spec.target)
            names[env[n]] = spec.target
        elif n.op == "call_function":
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: env[a])
            if n.target in _CHECKS:
                continue
            if n.target is aten.add_.Tensor and str(names.get(args[0], "")).endswith("num_batches_tracked"):
                continue  # BatchNorm's counter: the module call counts it
            path = _as_module_call(n.target, args, names, model)
            if path is not None:
                attrs[path] = model.get_submodule(path)
                out = graph.call_module(path, (args[0],))
            elif n.target in ATEN_RULES:
                out = ATEN_RULES[n.target](graph, args, kwargs)
            else:
                out = graph.call_function(n.target, args, kwargs)
            out.meta["val"] = n.meta.get("val")
            out.meta["nn_module_stack"] = n.meta.get("nn_module_stack", {})
            env[n] = out
        elif n.op == "get_attr":  # the body of a higher-order op (autocast or no_grad regions): kept as it is
            attrs[n.target] = getattr(ep.graph_module, n.target)
            env[n] = graph.get_attr(n.target)
        elif n.op == "output":
            outs = list(n.args[0])
            kinds = [s.kind for s in sig.output_specs]
            if any(k != OutputKind.USER_OUTPUT for k in kinds):
                mutated = [s.target for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
                raise TraceError(f"'{name}' mutates {', '.join(map(str, mutated))} in its forward: fxprune reads "
                                 "forwards that change no state but BatchNorm's running statistics")
            result = pytree.tree_unflatten([env[o] if isinstance(o, fx.Node) else o for o in outs], ep.call_spec.out_spec)
            if isinstance(result, dict) and type(result) is not dict:  # a transformers ModelOutput
                graph.set_codegen(TypedOutput(type(result)))
                result = dict(result)
            graph.output(result)
        else:  # pragma: no cover - the training IR has no other node kinds
            raise TraceError(f"'{name}' exports a '{n.op}' node ('{n.name}'), which fxprune does not read")
    for node in list(graph.nodes):  # a get_attr a module call replaced is read no more
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    referenced = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    gm = fx.GraphModule({k: v for k, v in attrs.items() if k in referenced}, graph, name)
    return gm
