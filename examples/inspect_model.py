"""Print the channel groups and residual branches fxprune finds in a model, and draw
where the gates go.

    python examples/inspect_model.py            # same as: fxprune inspect resnet50 --graph out/resnet50_gates.png
"""

import torch
import torchvision

import fxprune
from fxprune.report.gate_graph import gate_graph, write_gate_graph
from fxprune.report.tables import branches_table, groups_table, summary

model = torchvision.models.resnet50().eval()
cg = fxprune.analyze(fxprune.trace(model, (torch.randn(1, 3, 224, 224),)))
print(summary(cg))
print(groups_table(cg))
print(branches_table(cg))
print("drawn to", write_gate_graph(gate_graph(cg), "out/resnet50_gates.png", "resnet50: channel groups and layer gates"))
