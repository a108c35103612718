"""Clean training (BackdoorBench's ``prototype``): the same victim and schedule, no poisoning; the baseline an
attack's clean accuracy is compared with. Writes ``clean_model.pth`` (a bare state dict) instead of a record."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import ATTACKS
from .base import Attack, AttackConfig


@dataclass
class PrototypeConfig(AttackConfig):
    attack: str = "prototype"


@ATTACKS.register("prototype", aliases=["clean"])
class Prototype(Attack):
    """No attack: trains a clean model with the attacks' training setup (writes clean_model.pth)."""

    config_class = PrototypeConfig
    poisons = False
    writes_poison_index_list = False

    def apply_trigger(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        return images
