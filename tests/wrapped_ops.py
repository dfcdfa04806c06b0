"""A model calling a function that symbolic tracing keeps whole, as torchvision's Swin
calls ``shifted_window_attention``: ``torch.fx.wrap`` must be called at module level, and
the call must look the name up in this module's globals."""

import torch
import torch.nn.functional as F
from torch import nn


def scaled_mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias) * 0.5


torch.fx.wrap("scaled_mix")


class UsesWrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(F.relu(scaled_mix(F.relu(self.a(x)), self.mid.weight, self.mid.bias)))
