"""ResNet-style classifiers (He et al. 2016) sized for 28-128 px inputs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

PRESETS = {
    "cpu": {"width": 32, "blocks": [1, 1, 1]},          # ~0.7M parameters
    "gpu": {"width": 64, "blocks": [2, 2, 2, 2]},       # ResNet-18 layout, ~11M parameters
}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, blocks=(1, 1, 1)):
        super().__init__()
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        if x.shape[-1] > 64:  # large inputs: downsample early as ImageNet ResNets do
            x = F.avg_pool2d(x, x.shape[-1] // 32)
        h = self.layers(self.stem(x))
        # A mean, not adaptive_avg_pool2d: its CUDA backward has no deterministic kernel (same bits on CPU).
        return self.head(h.mean((2, 3)))
