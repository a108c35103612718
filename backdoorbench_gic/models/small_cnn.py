"""A small BatchNorm CNN for CPU-scale experiments (about 0.1M parameters at width 32).

Four 3x3 convolutions with BatchNorm and one residual block, global average pooling and a linear head.
Not a BackdoorBench model: records that use it name it ``smallcnn`` and load only here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import MODELS


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.width = width
        self.stem = _conv_bn(in_channels, width)
        self.down1 = _conv_bn(width, 2 * width, stride=2)
        self.res_conv1 = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(2 * width)
        self.res_conv2 = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(2 * width)
        self.down2 = _conv_bn(2 * width, 4 * width, stride=2)
        self.linear = nn.Linear(4 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down1(self.stem(x))
        res = F.relu(self.res_bn1(self.res_conv1(out)))
        out = F.relu(out + self.res_bn2(self.res_conv2(res)))
        out = self.down2(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


@MODELS.register("smallcnn", aliases=["small_cnn"])
def smallcnn(num_classes: int = 10, in_channels: int = 1, width: int | None = None) -> SmallCNN:
    """Small BatchNorm CNN with one residual block, for fast CPU runs."""
    return SmallCNN(num_classes, in_channels, width or 32)
