"""torchvision's ResNet-18 and VGG-19-BN as BackdoorBench builds them (random init, ``num_classes`` head), so
their state-dict keys match; the first convolution is replaced when the input is not 3-channel. The
subclasses only add ``forward_features`` (penultimate features) and name their head."""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vgg import VGG, cfgs, make_layers

from ..registry import MODELS


class ResNet18(ResNet):
    head_name = "fc"

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class VGG19BN(VGG):
    head_name = "classifier.6"

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__(make_layers(cfgs["E"], batch_norm=True), num_classes=num_classes)
        if in_channels != 3:
            self.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:-1](x)


def _no_width(name: str, width: int | None) -> None:
    if width not in (None, 64):
        raise ValueError(f"{name} has no width option; use preactresnet18 or smallcnn for a narrower network")


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, width: int | None = None) -> nn.Module:
    """torchvision ResNet-18 (random init), BackdoorBench's ``resnet18``."""
    _no_width("resnet18", width)
    return ResNet18(num_classes, in_channels)


@MODELS.register("vgg19_bn")
def vgg19_bn(num_classes: int = 10, in_channels: int = 3, width: int | None = None) -> nn.Module:
    """torchvision VGG-19 with BatchNorm (random init), BackdoorBench's ``vgg19_bn``."""
    _no_width("vgg19_bn", width)
    return VGG19BN(num_classes, in_channels)
