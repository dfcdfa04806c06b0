"""The pruner: projected SGD on theta, pruning checks, and live removal during training.

    pruner = fxprune.Pruner(gated, optimizer)
    for x, y in loader:
        loss = criterion(gated(x), y) + pruner.penalty()
        optimizer.zero_grad(); loss.backward(); optimizer.step(); pruner.step()

A structure is removed at a check (every ``check_every`` steps) once its theta has been
at or below ``theta_tol`` for ``patience`` checks and its weights are in the domain of
attraction of zero (RMS at most ``w_tol`` times that of the kept weights). Removal
compacts the live model: the same ``Parameter`` objects are sliced, and so is the
optimizer state (momentum, Adam moments); removed branches leave the optimizer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, fx

from .api import EXAMPLE, channel_graph, config_of
from .config import PruneConfig
from .cost import forward_flops
from .objective import Objective
from .passes import CHANNEL_GRAPH, Compact
from .passes.insert_gates import LAYERS, READS, UNITS, gate_modules

__all__ = ["Pruner", "slice_optimizer_state"]


def slice_optimizer_state(optimizer: torch.optim.Optimizer, param: Tensor, dim: int, idx: np.ndarray, old_shape: torch.Size) -> None:
    """Slice every per-element state tensor of ``param`` (momentum, Adam moments) like the parameter."""
    state = optimizer.state.get(param)
    if not state:
        return
    index = torch.as_tensor(idx, dtype=torch.long)
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == old_shape:
            state[key] = value.index_select(dim, index.to(value.device)).contiguous()


def _drop_from_optimizer(optimizer: torch.optim.Optimizer, live: set[int]) -> None:
    for group in optimizer.param_groups:
        gone = [p for p in group["params"] if id(p) not in live]
        for p in gone:
            optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) in live]


class Pruner:
    """Learns the gates of ``gated`` next to the user's ``optimizer`` and removes
    structures during training. ``config`` defaults to the one given to ``prepare``."""

    def __init__(self, gated: fx.GraphModule, optimizer: torch.optim.Optimizer, config: PruneConfig | None = None) -> None:
        self.gated, self.optimizer = gated, optimizer
        self.config = config or config_of(gated)
        cg = channel_graph(gated)
        units, layers = gate_modules(gated, UNITS), gate_modules(gated, LAYERS)
        if not len(units) and not len(layers):
            reasons = sorted({g.frozen[0] for g in cg.groups if g.frozen})[:5]
            raise ValueError(
                "the model has no prunable structure: every channel group is frozen and there is no residual "
                f"branch (reasons: {'; '.join(reasons)})"
            )
        for gate in [*units.values(), *layers.values()]:
            gate.theta.requires_grad_(True)
        self.objective = Objective(gated, self.config)
        self.steps = 0
        self.below: dict[str, np.ndarray] = {}
        #: forward FLOPs per example of the live model, one entry per step
        self.flops_per_step: list[int] = []
        #: one dict per removal: step, units removed per group, branches removed
        self.removals: list[dict] = []
        self.dense_flops = self.objective.dense_flops
        self._flops = self.dense_flops

    # ----------------------------------------------------------------- training loop
    def penalty(self) -> Tensor:
        """GSM prior plus ``gamma * C(theta)``; add it to the task loss."""
        return self.objective.penalty(self.gamma())

    def gamma(self) -> float:
        """The cost strength at this step: ``gamma``, ramped linearly over ``warmup`` steps."""
        c = self.config
        return c.gamma * min(1.0, self.steps / c.warmup) if c.warmup else c.gamma

    def gates(self) -> dict[str, torch.nn.Module]:
        units, layers = gate_modules(self.gated, UNITS), gate_modules(self.gated, LAYERS)
        return {**{f"{UNITS}.{k}": g for k, g in units.items()}, **{f"{LAYERS}.{k}": g for k, g in layers.items()}}

    @torch.no_grad()
    def step(self) -> dict | None:
        """Projected SGD on theta; every ``check_every`` steps, the pruning check.
        Returns what was removed at this step, if anything."""
        lr = self.config.theta_lr
        for name, gate in self.gates().items():
            if gate.theta.grad is not None:
                if not torch.isfinite(gate.theta.grad).all():
                    raise FloatingPointError(
                        f"the theta gradient of '{name}' is not finite at step {self.steps}: the loss diverged; "
                        "lower the weight learning rate or gamma")
                gate.theta.sub_(lr * gate.theta.grad).clamp_(0.0, 1.0)
                gate.theta.grad = None
        self.steps += 1
        self.flops_per_step.append(self._flops)
        return self.check() if self.steps % self.config.check_every == 0 else None

    # ----------------------------------------------------------------- pruning conditions
    def _patience(self, key: str, off: np.ndarray) -> np.ndarray:
        count = np.where(off, self.below.get(key, np.zeros(len(off), dtype=int)) + 1, 0)
        self.below[key] = count
        return count >= self.config.patience

    @torch.no_grad()
    def check(self) -> dict | None:
        """Apply the pruning conditions and remove what meets them."""
        c = self.config
        unit_drop: dict[int, np.ndarray] = {}
        for u in self.objective.units:
            theta = u.gate.theta.detach().cpu().numpy()
            ripe = self._patience(f"{UNITS}.g{u.group}", theta <= c.theta_tol)
            if not ripe.any():
                continue
            sq, elems = self.objective.unit_sq(u).cpu().numpy(), u.elems.numpy()
            kept = theta > c.theta_tol
            ref = np.sqrt(sq[kept].sum() / max(elems[kept].sum(), 1)) if kept.any() else np.sqrt(sq.sum() / max(elems.sum(), 1))
            drop = ripe & (np.sqrt(sq / np.maximum(elems, 1)) <= c.w_tol * ref)
            if drop.any():
                unit_drop[u.group] = drop
            if c.reset_moments and (ripe & ~drop).any():
                self._reset_moments([(p, dim, torch.as_tensor(ripe & ~drop, device=p.device)[idx]) for p, dim, idx in u.slices])
        layer_drop: set[int] = set()
        # the reference: the weights outside every switched-off branch
        off = {id(p) for l in self.objective.layers if l.gate.theta.item() <= c.theta_tol for p in l.params}
        weights = [p for p in self.objective.weights if id(p) not in off] or self.objective.weights
        ref = torch.sqrt(sum(p.pow(2).sum() for p in weights) / max(sum(p.numel() for p in weights), 1)).item()
        for l in self.objective.layers:
            ripe = self._patience(f"{LAYERS}.b{l.branch}", l.gate.theta.detach().cpu().numpy() <= c.theta_tol)
            rms = torch.sqrt(sum(p.pow(2).sum() for p in l.params) / max(l.numel, 1)).item() if l.params else 0.0
            if ripe[0] and rms <= c.w_tol * ref:
                layer_drop.add(l.branch)
            elif ripe[0] and c.reset_moments:
                self._reset_moments([(p, 0, torch.ones(p.shape[0], dtype=torch.bool, device=p.device)) for p in l.params if p.dim()])
        if not unit_drop and not layer_drop:
            return None
        return self.remove(unit_drop, layer_drop)

    def _reset_moments(self, entries: list[tuple[Tensor, int, Tensor]]) -> None:
        """Zero the optimizer state (momentum, Adam moments) of the switched-off entries:
        ``(param, dim, mask over that dim)``. A switched-off structure gets no data gradient
        any more, only the spike prior's pull to zero; moments remembered from its active
        past would damp that pull for thousands of steps under Adam (second moments decay
        with 1 - beta2 = 1e-3), and the structure would never reach the weight condition."""
        for p, dim, mask in entries:
            state = self.optimizer.state.get(p)
            if not state:
                continue
            index = mask.nonzero().flatten()
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.index_fill_(dim, index.to(value.device), 0.0)

    # ----------------------------------------------------------------- live removal
    def _never_empty(self, unit_drop: dict[int, np.ndarray], dead: set[str]) -> dict[int, np.ndarray]:
        """Keep, in every channel space still in the graph, at least its best unit."""
        cg = channel_graph(self.gated)
        live_nodes = {n.name for n in self.gated.graph.nodes} - dead
        units = gate_modules(self.gated, UNITS)
        keep = {}
        for gid, drop in unit_drop.items():
            k = ~drop
            theta = units[f"g{gid}"].theta.detach().cpu().numpy()
            for s in cg.groups[gid].spaces:
                idx = cg.groups[gid].unit_index[s]
                if cg.spaces[s].node in live_nodes and len(idx) and not k[idx].any():
                    k[idx[np.argmax(theta[idx])]] = True
            if not k.all():
                keep[gid] = k
        return keep

    def remove(self, unit_drop: dict[int, np.ndarray], layer_drop: set[int]) -> dict:
        """Remove units (``unit_drop[group]`` True = remove) and branches from the live model."""
        gated, cg = self.gated, channel_graph(self.gated)
        dead = set().union(*(cg.branches[i].nodes for i in layer_drop)) if layer_drop else set()
        unit_keep = self._never_empty(unit_drop, dead)
        compact = Compact(cg, unit_keep, set(layer_drop))
        compact(gated)
        params = dict(gated.named_parameters())
        for name, dim, idx, old_shape in compact.sliced:
            if name in params:
                slice_optimizer_state(self.optimizer, params[name], dim, idx, old_shape)
        _drop_from_optimizer(self.optimizer, {id(p) for p in gated.parameters()})

        new_cg = cg.restrict(unit_keep)
        gated.meta[CHANNEL_GRAPH] = new_cg
        units = gate_modules(gated, UNITS)
        for gid, keep in unit_keep.items():
            key = f"g{gid}"
            if key in units:
                units[key].slice_(keep, new_cg.groups[gid].segments())
                if f"{UNITS}.{key}" in self.below:
                    self.below[f"{UNITS}.{key}"] = self.below[f"{UNITS}.{key}"][keep]
        for read in gate_modules(gated, READS).values():
            if read.group in unit_keep:
                g = new_cg.groups[read.group]
                read.set_index(g.unit_index[read.space], g.num_units)
        self.objective.rebuild()
        self._flops = self.forward_flops()
        record = {
            "step": self.steps,
            "units": {gid: int((~k).sum()) for gid, k in unit_keep.items()},
            "layers": sorted(layer_drop),
            "flops": self._flops,
            "keep": {gid: k.tolist() for gid, k in unit_keep.items()},
        }
        self.removals.append(record)
        return record

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Steps, patience counters, FLOPs history and every removal with its keep masks:
        with the model's and optimizer's state dicts, enough to resume exactly."""
        return {
            "steps": self.steps,
            "below": {k: v.tolist() for k, v in self.below.items()},
            "flops_per_step": list(self.flops_per_step),
            "removals": [dict(r) for r in self.removals],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replay the saved removals on this pruner's freshly prepared model and optimizer
        (so parameter and optimizer shapes match the checkpoint), then restore the counters.
        Load the model's and the optimizer's state dicts after this."""
        if self.removals or self.steps:
            raise RuntimeError(
                "Pruner.load_state_dict needs a fresh pruner: build the gated model, optimizer and Pruner "
                "again as at the start of training, then load the checkpoint")
        for record in state["removals"]:
            keep = {int(g): np.asarray(k, dtype=bool) for g, k in record["keep"].items()}
            self.remove({g: ~k for g, k in keep.items()}, set(record["layers"]))
        self.steps = int(state["steps"])
        self.below = {k: np.asarray(v, dtype=int) for k, v in state["below"].items()}
        self.flops_per_step = list(state["flops_per_step"])
        self.removals = [dict(r) for r in state["removals"]]

    # ----------------------------------------------------------------- accounting
    def forward_flops(self) -> int:
        """Forward FLOPs per example of the live (partly compacted) model, gates as in eval."""
        example = self.gated.meta.get(EXAMPLE)
        return forward_flops(self.gated, example) if example is not None else 0

    def training_flops_ratio(self) -> float:
        """Cumulative forward FLOPs of the steps so far over dense training's."""
        return sum(self.flops_per_step) / max(self.dense_flops * len(self.flops_per_step), 1)
