"""Tables of what the analysis found: channel groups and residual branches (tabulate)."""

from __future__ import annotations

from tabulate import tabulate

from ..passes import ChannelGraph

__all__ = ["group_rows", "groups_table", "branches_table", "summary", "widths_table"]


def _names(items: list[str], limit: int = 3) -> str:
    items = list(dict.fromkeys(items))
    more = f" +{len(items) - limit}" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def group_rows(cg: ChannelGraph) -> list[dict]:
    """One dict per group: id, units, producers, consumers, carriers, status."""
    by_group: dict[int, dict[str, list[str]]] = {g.id: {"producer": [], "consumer": [], "carrier": []} for g in cg.groups.values()}
    for b in cg.bindings:
        by_group[cg.spaces[b.space].group][b.role].append(b.owner)
    kinds = ("heads", "head_dim")
    factor_of: dict[int, tuple[str, list[int]]] = {}  # a factor group: what it is, and of which product groups
    for g in cg.groups.values():
        for i, ids in enumerate(g.factor_ids()):
            for f in ids:
                factor_of.setdefault(f, (kinds[min(i, 1)], []))[1].append(g.id)
                for role, owners in by_group[g.id].items():
                    by_group[f][role] += owners
    rows = []
    for g in cg.groups.values():
        roles = by_group[g.id]
        if not (roles["producer"] or roles["consumer"]):
            continue  # groups no layer touches (inputs, shape-only tensors)
        status = "prunable" if g.prunable else f"frozen: {g.frozen[0]}"
        if g.prunable and g.derived:
            parts = [" + ".join(map(str, ids)) for ids in g.factor_ids()]
            status = "prunable through groups " + " x ".join(f"{p} ({k})" for p, k in zip(parts, kinds))
        elif g.id in factor_of:
            kind, of = factor_of[g.id]
            status = f"prunable: the {kind} of groups {', '.join(map(str, of))}" if g.prunable else status
        rows.append({
            "group": g.id, "units": g.num_units, "producers": roles["producer"], "consumers": roles["consumer"],
            "carriers": roles["carrier"], "status": status,
        })
    return rows


def groups_table(cg: ChannelGraph, fmt: str = "simple") -> str:
    rows = [
        [r["group"], r["units"], _names(r["producers"]), _names(r["consumers"]), r["status"]]
        for r in group_rows(cg)
    ]
    return tabulate(rows, headers=["group", "units", "producers", "consumers", "status"], tablefmt=fmt, maxcolwidths=[None, None, 40, 40, 60])


def branches_table(cg: ChannelGraph, fmt: str = "simple") -> str:
    rows = [[b.id, b.add, b.stream, len(b.nodes)] for b in cg.branches.values()]
    return tabulate(rows, headers=["branch", "add", "stream x", "ops in F(x)"], tablefmt=fmt)


def summary(cg: ChannelGraph) -> str:
    prunable, total = cg.prunable_share()
    lines = [
        f"{len(cg.prunable_groups)} prunable of {len(group_rows(cg))} channel groups; "
        f"{prunable}/{total} conv/linear output channels prunable ({100 * prunable / max(total, 1):.1f}%); "
        f"{len(cg.branches)} residual branches"
    ]
    if cg.leaves:
        lines += [f"traced as leaf: {k}: {v}" for k, v in cg.leaves.items()]
    return "\n".join(lines)


def widths_table(widths: list[tuple[str, int, int]], fmt: str = "github", changed_only: bool = False) -> str:
    """``layer | before | after`` from :meth:`fxprune.Pruner.widths` ("removed" for a layer
    whose branch went)."""
    rows = [[name, before, after if after else "removed"] for name, before, after in widths
            if not changed_only or after != before]
    return tabulate(rows, headers=["layer", "width before", "width now"], tablefmt=fmt, disable_numparse=True,
                    colalign=("left", "right", "right"))
