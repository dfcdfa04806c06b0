"""Print the channel groups and residual branches fxprune finds in a model.

    python examples/inspect_model.py            # same as: fxprune inspect resnet50
"""

import torch
import torchvision

import fxprune
from fxprune.report import branches_table, groups_table, summary

model = torchvision.models.resnet50().eval()
cg = fxprune.analyze(fxprune.trace(model, (torch.randn(1, 3, 224, 224),)))
print(summary(cg))
print(groups_table(cg))
print(branches_table(cg))
