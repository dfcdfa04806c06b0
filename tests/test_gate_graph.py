"""The gate-placement picture: what the graph holds, and the files it is drawn to."""

import subprocess
import sys

import pydot
import pytest
import torch
import torchvision

import fxprune
from fxprune.cli import main
from fxprune.digits.models import resnet
from fxprune.report.gate_graph import gate_graph, write_gate_graph
from fxprune.state import decisions, state_of
from fxprune.testing import random_masks


def analysed(model, shape):
    return fxprune.analyze(fxprune.trace(model.eval(), (torch.randn(*shape),)))


def test_graph_has_a_node_per_group_and_per_branch():
    cg = analysed(resnet(), (1, 1, 8, 8))
    G = gate_graph(cg, collapse=False)
    layers = [n for n, d in G.nodes(data=True) if d["kind"] == "layer"]
    assert len(layers) == len(cg.branches) == 9
    groups = {g for n, d in G.nodes(data=True) if d["kind"] == "group" for g in d["groups"]}
    assert {g.id for g in cg.prunable_groups} <= groups
    frozen = [d for d in G.nodes.values() if d["kind"] == "group" and not d["prunable"]]
    assert {d["reason"].split(" ")[0] for d in frozen} == {"graph", "model"}  # input and output
    # every layer gate sits between its branch's inner group and the stream it adds to
    for n in layers:
        (pred,), (succ,) = G.predecessors(n), G.successors(n)
        assert G.nodes[pred]["kind"] == G.nodes[succ]["kind"] == "group"
        assert G.nodes[succ]["last"] >= G.nodes[n]["first"]


def test_resnet50_chains_collapse():
    cg = analysed(torchvision.models.resnet50(), (1, 3, 64, 64))
    full, small = gate_graph(cg, collapse=False), gate_graph(cg)
    assert small.number_of_nodes() < full.number_of_nodes() - 10
    units = lambda G: sum(d["units"] for d in G.nodes.values() if d["kind"] == "group")
    assert units(small) == units(full)


def test_trained_gates_colour_the_groups():
    x = torch.randn(2, 1, 8, 8)
    gated = fxprune.prepare(resnet(), (x,))
    cg = fxprune.channel_graph(gated)
    random_masks(gated, keep=0.5, seed=3)
    G = gate_graph(cg, gated, collapse=False)
    keep, drop = decisions(gated)
    for gid, k in keep.items():
        d = G.nodes[f"g{gid}"]
        assert d["kept"] == int(k.sum()) and d["units"] == len(k)
    dropped = [n for n, d in G.nodes(data=True) if d["kind"] == "layer" and d["theta"] < 0.5]
    assert drop and dropped == [f"L{b}" for b in sorted(drop)]
    assert len(state_of(gated).layout.layers) == 9


@pytest.mark.parametrize("suffix", [".png", ".svg", ".dot"])
def test_written_files(tmp_path, suffix):
    G = gate_graph(analysed(resnet(), (1, 1, 8, 8)))
    path = write_gate_graph(G, tmp_path / f"gates{suffix}", "digits resnet")
    data = path.read_bytes()
    if suffix == ".png":
        assert data.startswith(b"\x89PNG")
    elif suffix == ".svg":
        assert b"<svg" in data and b"L8" in data
    else:
        (dot,) = pydot.graph_from_dot_file(str(path))
        assert len(dot.get_nodes()) >= G.number_of_nodes()


def test_inspect_draws_the_graph(tmp_path, capsys):
    out = tmp_path / "r18.svg"
    assert main(["inspect", "resnet18", "--input-shape", "1,3,64,64", "--graph", str(out)]) == 0
    assert out.stat().st_size > 1000 and "gate placement drawn" in capsys.readouterr().out


def test_bad_picture_paths_are_clear_errors(tmp_path, capsys):
    assert main(["inspect", "resnet18", "--graph", str(tmp_path / "g.jpeg")]) == 2
    assert "must end in one of .png" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["inspect", "resnet18", "--graph", str(tmp_path / "a-file" / "g.png")]) == 2
    assert "cannot write the gate picture" in capsys.readouterr().err


def test_drawing_leaves_the_process_matplotlib_backend_alone(tmp_path):
    """Library code changes no process-wide state: the pictures are drawn without pyplot,
    so a user's interactive backend is not switched to Agg."""
    code = (
        "import sys, matplotlib; matplotlib.use('svg'); "
        "from fxprune.report.gate_graph import gate_graph, write_gate_graph; "
        "from fxprune.report.costs import layer_costs, plot_costs; "
        "import fxprune, torch; from fxprune.digits.models import resnet; "
        "gm = fxprune.trace(resnet().eval(), (torch.randn(1, 1, 8, 8),)); "
        f"write_gate_graph(gate_graph(fxprune.analyze(gm)), r'{tmp_path / 'g.png'}', 't'); "
        "c = layer_costs(gm, (torch.randn(1, 1, 8, 8),)); "
        f"plot_costs(c, c, r'{tmp_path / 'c.png'}', 't'); "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
