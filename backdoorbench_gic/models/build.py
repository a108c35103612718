"""Building networks by name, and rebuilding the right architecture for a stored state dict.

BackdoorBench records keep only ``model_name`` and ``num_classes``; our narrower or grey-scale variants are
recognised from the shapes in the state dict (the first convolution gives width and input channels).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from ..data.specs import get_spec
from ..registry import MODELS
from .wrapper import VictimModel

_FIRST_CONV = {
    "preactresnet18": "conv1.weight",
    "smallcnn": "stem.0.weight",
    "resnet18": "conv1.weight",
    "vgg19_bn": "features.0.weight",
}
_HAS_WIDTH = {"preactresnet18", "smallcnn"}


def infer_arch_kwargs(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """``{"in_channels": C, "width": W}`` read off the first convolution's weight, where the model has one."""
    name = MODELS.resolve(model_name)
    key = _FIRST_CONV.get(name)
    if key is None or key not in state_dict:
        return {}
    w = state_dict[key]
    out = {"in_channels": int(w.shape[1])}
    if name in _HAS_WIDTH:
        out["width"] = int(w.shape[0])
    return out


def build_model(model_name: str, num_classes: int, dataset: str | None = None, *, in_channels: int | None = None,
                width: int | None = None, normalize: bool = True) -> nn.Module:
    """A fresh network, wrapped in the dataset's normalisation when ``dataset`` is given and ``normalize``."""
    if in_channels is None:
        in_channels = get_spec(dataset).channels if dataset else 3
    net = MODELS.build(model_name, num_classes=num_classes, in_channels=in_channels, width=width)
    if dataset is None or not normalize:
        return net
    spec = get_spec(dataset)
    return VictimModel(net, spec.mean, spec.std, name=MODELS.resolve(model_name))


def build_model_for_state_dict(model_name: str, num_classes: int, state_dict: Mapping[str, torch.Tensor],
                               dataset: str | None = None) -> nn.Module:
    """A fresh network whose shapes match ``state_dict`` (weights not loaded)."""
    return build_model(model_name, num_classes, dataset, **infer_arch_kwargs(model_name, state_dict))
