"""The victim as every stage sees it: a bare network behind a fixed normalisation layer.

Pixels stay in [0,1] between stages, so GIC's budget is measured in pixel space and every defense sees the
same input convention. The normalisation constants are non-persistent buffers: ``wrapper.net.state_dict()``
is exactly the bare network's, with BackdoorBench's parameter names.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def head_of(net: nn.Module) -> tuple[str, nn.Linear]:
    """The final linear layer and its dotted name (``linear`` for BackdoorBench's PreActResNet)."""
    name = getattr(net, "head_name", None) or ("linear" if hasattr(net, "linear") else None)
    if name is None:
        raise AttributeError(f"{type(net).__name__} has no known classification head (expected .linear or .head_name)")
    return name, net.get_submodule(name)


class VictimModel(nn.Module):
    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], name: str = ""):
        super().__init__()
        self.net = net
        self.model_name = name
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the head's input)."""
        return self.net.forward_features(self.normalize(x))

    @property
    def head(self) -> nn.Linear:
        return head_of(self.net)[1]

    def bare_state_dict(self) -> dict[str, torch.Tensor]:
        """The bare network's weights on the CPU: what BackdoorBench files store."""
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
