"""FT: plain fine-tuning of the whole victim on the clean auxiliary set (BackdoorBench's ``ft``).

The baseline every other purification is measured against: cross-entropy, SGD lr 0.01 momentum 0.9 wd 5e-4,
CosineAnnealingLR, 100 epochs, batch 256, with the dataset's train augmentation (BackdoorBench applies its
train transform to ft's clean subset). Tiny-ImageNet: 200 epochs with ReduceLROnPlateau. The template's
defaults are exactly this algorithm, so the class holds only its settings.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import DEFENSES
from .base import Defense, DefenseConfig


@dataclass
class FTConfig(DefenseConfig):
    """BackdoorBench's ft keys (all common ones); only the epoch count differs from the shared defaults."""

    epochs: int = 100


@DEFENSES.register("ft", aliases=["finetune", "fine-tuning"])
class FT(Defense):
    """Fine-tuning on the auxiliary set (cross-entropy, train augmentation)."""

    config_class = FTConfig
    augment = True
