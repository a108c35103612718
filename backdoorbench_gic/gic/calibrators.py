"""Calibrators g: learnable input transformations bounded by ||g(x) - x||_p <= delta by construction.

Every calibrator computes a perturbation p(x) whose norm cannot exceed delta, then returns
clamp(x + p(x), 0, 1). Clamping moves each pixel towards x (x itself lies in [0,1]), so it can only shrink
|g(x) - x| coordinate-wise and the bound survives for both budgets:
- L-infinity: p = delta * tanh(v), every coordinate in (-delta, delta);
- L2 (per image): p = delta * tanh(||v||) * v / ||v||, so ||p||_2 < delta.

Families (gic-method.md section 3):
- ``prompt``: one learnable tensor v of image shape shared by all inputs (a universal visual prompt);
- ``generator``: a small conv net G with v = G(x), a per-sample residual; its last layer starts at zero so
  g starts as the identity;
- ``prompt+generator``: both perturbations summed and projected back onto the delta ball.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..utils.norms import project

NORMS = ("linf", "l2")


def bound_perturbation(v: torch.Tensor, delta: float, norm: str) -> torch.Tensor:
    """Map an unconstrained tensor (N x C x H x W, or one C x H x W image) to a perturbation of norm < delta."""
    if norm == "linf":
        return delta * torch.tanh(v)
    if norm == "l2":
        batch = v if v.dim() == 4 else v.unsqueeze(0)
        n = batch.reshape(batch.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        out = batch * (delta * torch.tanh(n) / n).view(-1, 1, 1, 1)
        return out if v.dim() == 4 else out[0]
    raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")


class Calibrator(nn.Module):
    """Base: subclasses implement ``perturbation(x)``; ``forward`` adds it and clips to [0,1]."""

    family = "base"

    def __init__(self, delta: float, norm: str = "linf"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
        if not delta > 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        self.delta = float(delta)
        self.norm = norm

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.perturbation(x)).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"delta={self.delta:.5f}, norm={self.norm}"


class UniversalPrompt(Calibrator):
    family = "prompt"

    def __init__(self, shape: tuple[int, int, int], delta: float, norm: str = "linf"):
        super().__init__(delta, norm)
        self.v = nn.Parameter(torch.zeros(*shape))

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        p = bound_perturbation(self.v, self.delta, self.norm)
        return p.unsqueeze(0).expand_as(x)


class ResidualGenerator(Calibrator):
    family = "generator"

    def __init__(self, channels: int, delta: float, norm: str = "linf", hidden: int = 16):
        super().__init__(delta, norm)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        return bound_perturbation(self.net(x), self.delta, self.norm)


class PromptPlusGenerator(Calibrator):
    family = "prompt+generator"

    def __init__(self, shape: tuple[int, int, int], delta: float, norm: str = "linf", hidden: int = 16):
        super().__init__(delta, norm)
        self.prompt = UniversalPrompt(shape, delta, norm)
        self.generator = ResidualGenerator(shape[0], delta, norm, hidden)

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.prompt.perturbation(x) + self.generator.perturbation(x), self.norm, self.delta)


FAMILIES = {"prompt": UniversalPrompt, "generator": ResidualGenerator, "prompt+generator": PromptPlusGenerator}


def build_calibrator(family: str, shape: tuple[int, int, int], delta: float, norm: str = "linf",
                     hidden: int = 16) -> Calibrator:
    """``shape`` is (C, H, W)."""
    if family == "prompt":
        return UniversalPrompt(shape, delta, norm)
    if family == "generator":
        return ResidualGenerator(shape[0], delta, norm, hidden)
    if family == "prompt+generator":
        return PromptPlusGenerator(shape, delta, norm, hidden)
    raise ValueError(f"unknown calibrator family {family!r}: use one of {', '.join(FAMILIES)}")
