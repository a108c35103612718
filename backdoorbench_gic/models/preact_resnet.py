"""PreAct-ResNet-18 with BackdoorBench's parameter names, so its state dicts load strictly in both projects.

Re-implemented from He et al., "Identity Mappings in Deep Residual Networks" (2016) and the layer
description in backdoorbench-formats.md section 5.1: conv1 (3x3, stride 1, no bias), layer1..layer4 of two
pre-activation blocks each (bn1, conv1, bn2, conv2, and a 1x1 strided ``shortcut.0`` conv in the first
block of layers 2-4, applied to the first ReLU output), no BatchNorm after layer4, adaptive average pooling,
and ``linear``. ``width`` scales the base channel count (64 in BackdoorBench) for CPU-sized runs;
``in_channels`` admits grey-scale input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import MODELS


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.width = width
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(width, 2, stride=1)
        self.layer2 = self._make_layer(2 * width, 2, stride=2)
        self.layer3 = self._make_layer(4 * width, 2, stride=2)
        self.layer4 = self._make_layer(8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.avgpool(out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


@MODELS.register("preactresnet18", aliases=["preact_resnet18", "preact-resnet18"])
def preactresnet18(num_classes: int = 10, in_channels: int = 3, width: int | None = None) -> PreActResNet18:
    """PreAct-ResNet-18 (BackdoorBench names); width 64 is BackdoorBench's, 8/16 suit a CPU."""
    return PreActResNet18(num_classes, in_channels, width or 64)
