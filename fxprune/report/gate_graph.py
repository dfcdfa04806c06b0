"""The gate-placement picture: where the gates sit, drawn from the networkx analysis.

``gate_graph(cg, gated)`` builds a directed networkx graph whose nodes are the channel
groups (one unit gate vector each, or frozen with the reason) and the residual branches
(one layer gate each); an edge runs from the group a layer reads to the group it
writes, and a branch's layer gate sits between its last inner group and the stream its
add writes. Chains of small groups (a bottleneck's inner groups) are collapsed into one
node so that resnet50 stays legible. ``write_gate_graph(graph, path)`` writes ``.dot``
(pydot, for graphviz users) or draws ``.png``/``.svg``/``.pdf`` with matplotlib in a
layered layout: left to right in execution order, long-lived groups (residual streams)
as bars spanning the layers that use them.

After training, pass the gated model: each group is coloured by the fraction of its
units kept, each layer gate by its theta, and removed structures are marked.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import networkx as nx
from torch import fx

from ..files import writable
from ..gates import factor_slots
from ..passes import ChannelGraph
from ..state import decisions, gate_bank, state_of

__all__ = ["gate_graph", "write_gate_graph", "picture_path", "FORMATS"]

FORMATS = (".png", ".svg", ".pdf", ".dot")
FROZEN, ON, OFF = "#b0b0b0", "#3a9d5d", "#d64541"


def _positions(cg: ChannelGraph) -> dict[str, int]:
    """Execution position of every node the analysis saw (``node_dims`` is in graph order)."""
    return {name: i for i, name in enumerate(cg.node_dims)}


def _group_edges(cg: ChannelGraph) -> dict[tuple[int, int], list[str]]:
    """(read group, written group) -> the layers that read one and write the other."""
    reads, writes = defaultdict(set), defaultdict(set)
    for b in cg.bindings:
        if b.role in ("consumer", "producer"):
            (reads if b.role == "consumer" else writes)[b.owner].add(cg.spaces[b.space].group)
    edges: dict[tuple[int, int], list[str]] = defaultdict(list)
    for owner in reads.keys() & writes.keys():
        for a in reads[owner]:
            for b in writes[owner]:
                if a != b:
                    edges[(a, b)].append(owner)
    return edges


def gate_graph(cg: ChannelGraph, gated: fx.GraphModule | None = None, collapse: bool = True) -> nx.DiGraph:
    """The picture's graph. ``cg`` is the analysis of the dense model (``fxprune.channel_graph``
    right after ``prepare``); ``gated``, if given, supplies the thetas after training."""
    pos = _positions(cg)
    extent = defaultdict(list)  # group -> positions of every node whose output carries it
    for node in cg.node_dims:
        for space in _spaces_of(cg, node):
            extent[cg.spaces[space].group].append(pos[node])
    units = layers = None
    if gated is not None:  # what the gates hold now: (kept units, mean theta) per group, theta per branch
        layout, theta = state_of(gated).layout, gate_bank(gated).theta.detach().cpu()
        keep, _ = decisions(gated)
        units = {g: (int(keep[g].sum()), float(theta[sl].mean())) for g, sl in layout.units.items()}
        full = cg.complete_keep(keep)
        for g in cg.groups.values():  # a product group: kept where its factors are, theta their product
            if (slots := factor_slots(cg, layout.units, g.id)) is not None:
                units[g.id] = (int(full[g.id].sum()) if g.id in full else g.num_units, float(theta[slots].prod(1).mean()))
        layers = {b: float(theta[i]) for b, i in layout.layers.items()}
    edges = _group_edges(cg)
    used = {g for e in edges for g in e} | {cg.spaces[s].group for b in cg.branches.values() for s in _spaces_of(cg, b.add)}
    G = nx.DiGraph()
    for g in cg.groups.values():
        if g.id not in used:
            continue  # input and shape-only groups no layer touches
        where = extent[g.id] or [pos[cg.spaces[s].node] for s in g.spaces]
        kept, theta = g.num_units, 1.0
        if units is not None and g.prunable:
            kept, theta = units.get(g.id, (0, 0.0))
        G.add_node(f"g{g.id}", kind="group", groups=[g.id], units=g.num_units, kept=kept, theta=theta,
                   prunable=g.prunable, reason=g.frozen[0] if g.frozen else "", first=min(where), last=max(where))
    for (a, b), owners in edges.items():
        if f"g{a}" in G and f"g{b}" in G:
            G.add_edge(f"g{a}", f"g{b}", layers=owners)
    for br in cg.branches.values():
        add_groups = {cg.spaces[s].group for s in _spaces_of(cg, br.add)}
        inner = [g for g in G if G.nodes[g]["kind"] == "group"
                 and all(cg.spaces[s].node in br.nodes for s in cg.groups[G.nodes[g]["groups"][0]].spaces)]
        theta = 1.0 if layers is None else layers.get(br.id, 0.0)
        name = f"L{br.id}"
        G.add_node(name, kind="layer", theta=theta, removed=layers is not None and br.id not in layers,
                   first=pos[br.add], last=pos[br.add], add=br.add)
        source = max(inner, key=lambda g: G.nodes[g]["last"]) if inner else None
        for g in add_groups:
            target = f"g{g}"
            if source is not None and G.has_edge(source, target):
                G.remove_edge(source, target)
            G.add_edge(source or target, name, layers=[])
            G.add_edge(name, target, layers=[br.add])
    return _collapse_chains(G) if collapse else G


def _spaces_of(cg: ChannelGraph, node: str) -> list[int]:
    """The channel spaces of ``node``'s output (its own or the ones it carries)."""
    dims = cg.node_dims.get(node)
    return [s for s in dims.values() if not cg.spaces[s].batch] if isinstance(dims, dict) else []


def _collapse_chains(G: nx.DiGraph) -> nx.DiGraph:
    """Merge runs a -> b of group nodes where a has one successor, b one predecessor and
    both are short-lived (not streams), into one node."""
    def simple(n):
        d = G.nodes[n]
        return d["kind"] == "group" and d["prunable"]

    H = G.copy()
    for a, b in list(G.edges):
        if a not in H or b not in H or not (simple(a) and simple(b)):
            continue
        if H.out_degree(a) == 1 and H.in_degree(b) == 1 and H.has_edge(a, b):
            da, db = H.nodes[a], H.nodes[b]
            merged = {**da, "groups": da["groups"] + db["groups"], "units": da["units"] + db["units"],
                      "kept": da["kept"] + db["kept"], "first": min(da["first"], db["first"]),
                      "last": max(da["last"], db["last"]),
                      "theta": (da["theta"] * da["units"] + db["theta"] * db["units"]) / max(da["units"] + db["units"], 1)}
            H = nx.contracted_nodes(H, a, b, self_loops=False, copy=False)
            H.nodes[a].clear()
            H.nodes[a].update(merged)
    return H


def _label(n: str, d: dict) -> str:
    if d["kind"] == "layer":
        return f"{n}\nremoved" if d["removed"] else f"{n}\nθ={d['theta']:.2f}"
    gs = d["groups"]
    head = f"g{gs[0]}" if len(gs) == 1 else f"g{gs[0]}..g{gs[-1]} ({len(gs)})"
    size = f"{d['units']}" if d["kept"] == d["units"] else f"{d['kept']}/{d['units']}"
    return f"{head}\n{size}" if d["prunable"] else f"{head}\n{size} frozen"


def _colour(d: dict) -> str:
    import matplotlib

    if d["kind"] == "group" and not d["prunable"]:
        return FROZEN
    if d["kind"] == "layer":
        value = 0.0 if d["removed"] else d["theta"]
    else:
        value = d["kept"] / max(d["units"], 1)
    return matplotlib.colors.to_hex(matplotlib.colormaps["RdYlGn"](0.1 + 0.8 * value))


def _layout(G: nx.DiGraph) -> tuple[dict[str, tuple[float, float, float]], int]:
    """(x0, x1, lane) per node: x by execution order (compressed), lanes by first-fit
    interval scheduling so that boxes never overlap. Returns the layout and the lane count."""
    ticks = sorted({G.nodes[n][k] for n in G for k in ("first", "last")})
    rank = {t: i for i, t in enumerate(ticks)}
    # long-lived nodes first, so that the streams take the bottom lanes
    order = sorted(G, key=lambda n: (-(G.nodes[n]["last"] - G.nodes[n]["first"]), G.nodes[n]["first"]))
    # layer gates last, each on its branch's lane when that is free
    order = [n for n in order if G.nodes[n]["kind"] == "group"] + [n for n in order if G.nodes[n]["kind"] == "layer"]
    lanes: list[list[tuple[int, int]]] = []
    out = {}
    for n in order:
        a, b = rank[G.nodes[n]["first"]], rank[G.nodes[n]["last"]]
        preferred = [int(out[p][2]) for p in G.predecessors(n) if p in out]
        for i in preferred + list(range(len(lanes))):
            if all(b < x or a > y for x, y in lanes[i]):
                lanes[i].append((a, b))
                break
        else:
            i = len(lanes)
            lanes.append([(a, b)])
        out[n] = (float(a), float(b), float(i))
    return out, len(lanes)


def _draw(G: nx.DiGraph, path: Path, title: str) -> None:
    """Top to bottom in execution order; lanes left to right."""
    from matplotlib.figure import Figure  # no pyplot: the process-wide backend stays the user's
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyBboxPatch

    layout, n_lanes = _layout(G)
    depth = max(r1 for _, r1, _ in layout.values()) + 1
    half_w, half_h = 0.4, 0.32
    fig = Figure(figsize=(1.5 + 1.9 * max(n_lanes, 2), min(1.6 + 0.34 * depth, 120.0)))
    ax = fig.subplots()
    for n, (r0, r1, lane) in layout.items():
        d = G.nodes[n]
        if d["kind"] == "layer":
            ax.scatter([lane], [-r0], marker="D", s=260, c=_colour(d), edgecolors="black", lw=0.6, zorder=3)
            ax.text(lane + 0.12, -r0, _label(n, d).replace("\n", " "), ha="left", va="center", fontsize=6.5, zorder=4)
        else:
            ax.add_patch(FancyBboxPatch((lane - half_w, -r1 - half_h), 2 * half_w, r1 - r0 + 2 * half_h,
                                        boxstyle="round,pad=0.0,rounding_size=0.08",
                                        fc=_colour(d), ec="black", lw=0.6, zorder=2))
            ax.text(lane, -(r0 + r1) / 2, _label(n, d).replace("\n", "  "), ha="center", va="center", fontsize=6.5, zorder=4)
    for a, b in G.edges:
        a0, a1, la = layout[a]
        b0, b1, lb = layout[b]
        ra = min(max(b0, a0), a1)      # leave a where b starts (clamped to a's extent)
        rb = min(max(ra, b0), b1)
        if la == lb:
            start, end = (la, -a1 - half_h), (lb, -b0 + half_h)
            style = "arc3,rad=0.0" if b0 > a1 else "arc3,rad=-0.5"
        else:
            side = 1 if lb > la else -1
            wa = 0.1 if G.nodes[a]["kind"] == "layer" else half_w
            wb = 0.1 if G.nodes[b]["kind"] == "layer" else half_w
            start, end = (la + side * wa, -ra), (lb - side * wb, -rb)
            style = "arc3,rad=0.0"
        ax.annotate("", xy=end, xytext=start, zorder=1,
                    arrowprops=dict(arrowstyle="-|>", lw=0.6, color="#444444", shrinkA=0, shrinkB=0,
                                    mutation_scale=7, connectionstyle=style))
    ax.set_xlim(-0.6, max(n_lanes, 2) - 0.2)
    ax.set_ylim(-depth - 0.2, 1.2)
    ax.axis("off")
    legend = [
        Line2D([], [], marker="s", ls="", mfc=ON, mec="black", label="channel group (unit gates): all units kept"),
        Line2D([], [], marker="s", ls="", mfc=OFF, mec="black", label="units removed (colour: fraction kept)"),
        Line2D([], [], marker="s", ls="", mfc=FROZEN, mec="black", label="frozen group"),
        Line2D([], [], marker="D", ls="", mfc=ON, mec="black", label="layer gate of a residual branch (colour: theta)"),
    ]
    ax.legend(handles=legend, loc="upper left", fontsize=6.5, ncol=2, frameon=False, bbox_to_anchor=(0, 1.0))
    ax.set_title(title, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def _write_dot(G: nx.DiGraph, path: Path, title: str) -> None:
    D = nx.DiGraph(name="gates", rankdir="LR", label=title)
    for n, d in G.nodes(data=True):
        D.add_node(n, label=f'"{_label(n, d)}"', shape="diamond" if d["kind"] == "layer" else "box",
                   style="filled", fillcolor=f'"{_colour(d)}"')
    for a, b, d in G.edges(data=True):
        D.add_edge(a, b, tooltip=f'"{", ".join(d.get("layers", [])[:4])}"')
    nx.nx_pydot.to_pydot(D).write_raw(str(path))


def picture_path(path: str | os.PathLike) -> Path:
    """``path`` checked: a known suffix and a writable place (raises ValueError / OSError)."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"cannot draw to '{path}': the file name must end in one of {', '.join(FORMATS)}")
    return writable(path, "the gate picture")


def write_gate_graph(G: nx.DiGraph, path: str | os.PathLike, title: str = "") -> Path:
    """Write the picture to ``path``: ``.dot`` as graphviz source, ``.png``/``.svg``/``.pdf`` drawn."""
    path = picture_path(path)
    (_write_dot if path.suffix == ".dot" else _draw)(G, path, title)
    return path
