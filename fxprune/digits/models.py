"""Reference models for the built-in digits data (8x8 grey images, 10 classes).

``lenet_300_100`` and ``lenet5`` are the classic LeNets scaled to 8x8 inputs; ``vgg``
is a plain conv-BN-ReLU stack (prune its layers after :func:`fxprune.residualize`);
``resnet`` has three stages of basic blocks. ``width`` multiplies every hidden width.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["lenet_300_100", "lenet5", "vgg", "resnet", "mlp", "BasicBlock", "stage_widths", "STAGES", "BLOCKS", "FIRST_BLOCK"]

STAGES, BLOCKS, FIRST_BLOCK = 3, 3, 3  # resnet(): stem = modules 0-2, then the blocks


def lenet_300_100(width: float = 1) -> nn.Sequential:
    h1, h2 = round(300 * width), round(100 * width)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))


def mlp(inputs: int, classes: int, hidden: tuple[int, ...] = (100, 50), width: float = 1) -> nn.Sequential:
    """A ReLU MLP for the tables (breast-cancer: 30 inputs, 2 classes; wine: 13, 3)."""
    layers: list[nn.Module] = []
    n = inputs
    for h in hidden:
        h = round(h * width)
        layers += [nn.Linear(n, h), nn.ReLU()]
        n = h
    return nn.Sequential(*layers, nn.Linear(n, classes))


def lenet5(width: float = 1) -> nn.Sequential:
    c1, c2, f1, f2 = (round(c * width) for c in (6, 16, 120, 84))
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4 -> 2x2
        nn.Flatten(), nn.Linear(c2 * 4, f1), nn.ReLU(), nn.Linear(f1, f2), nn.ReLU(), nn.Linear(f2, 10),
    )


def vgg(width: float = 1, cfg: tuple = (32, 32, "M", 64, 64, 64, "M", 128, 128, 128)) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 1
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = round(v * width)
        layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


def resnet(width: float = 1, blocks: int = 3, widths: tuple[int, ...] = (16, 32, 64)) -> nn.Sequential:
    """Stem, then ``len(widths)`` stages of ``blocks`` basic blocks (stride 2 between stages)."""
    ws = [round(w * width) for w in widths]
    layers: list[nn.Module] = [nn.Conv2d(1, ws[0], 3, padding=1, bias=False), nn.BatchNorm2d(ws[0]), nn.ReLU()]
    c = ws[0]
    for i, w in enumerate(ws):
        for j in range(blocks):
            layers.append(BasicBlock(c, w, 2 if i and not j else 1))
            c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def stage_widths(model: nn.Module, stages: int = STAGES, blocks: int = BLOCKS) -> list[str]:
    """Per stage: the stream width and each block's inner width ('-' for a removed block)."""
    mods = dict(model.named_modules())
    out = []
    for s in range(stages):
        stream, inner = "?", []
        for b in range(FIRST_BLOCK + s * blocks, FIRST_BLOCK + (s + 1) * blocks):
            conv1, conv2, proj = mods.get(f"{b}.conv1"), mods.get(f"{b}.conv2"), mods.get(f"{b}.shortcut.0")
            inner.append(str(conv1.out_channels) if conv1 is not None else "-")
            for m in (conv2, proj):
                if m is not None:
                    stream = str(m.out_channels)
        if stream == "?" and s == 0:
            stream = str(mods["0"].out_channels)
        out.append(f"stream {stream}, blocks {' '.join(inner)}")
    return out
