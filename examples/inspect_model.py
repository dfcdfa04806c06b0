"""Print the channel groups and residual branches fxprune finds in a model, and draw
where the gates go.

    python examples/inspect_model.py [--model resnet50] [--input-shape 1,3,224,224] [--out out/resnet50_gates.png]

The same as: fxprune inspect resnet50 --graph out/resnet50_gates.png
"""

import argparse

import torch

import fxprune
from fxprune.report.gate_graph import gate_graph, write_gate_graph
from fxprune.report.tables import branches_table, groups_table, summary
from fxprune.testing.models import load_model

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="resnet50", help="a torchvision model name, or package.module:factory")
p.add_argument("--input-shape", default="1,3,224,224", help="example input shape (default 1,3,224,224)")
p.add_argument("--out", default="out/resnet50_gates.png", help="picture file: .png, .svg, .pdf or .dot")
args = p.parse_args()

model = load_model(args.model).eval()
shape = tuple(int(v) for v in args.input_shape.split(","))
cg = fxprune.analyze(fxprune.trace(model, (torch.randn(*shape),)))
print(summary(cg))
print(groups_table(cg))
print(branches_table(cg))
print("drawn to", write_gate_graph(gate_graph(cg), args.out, f"{args.model}: channel groups and layer gates"))
