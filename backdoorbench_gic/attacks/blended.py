"""Blended injection (Chen et al. 2017): the image is alpha-blended with a fixed trigger image."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_range
from ..registry import ATTACKS
from .base import Attack, AttackConfig
from .triggers import blend, default_blend_pattern, load_image


@dataclass
class BlendedConfig(AttackConfig):
    """``attack_trigger_img_path``: the trigger image (resized bilinearly to the image size); unset, a fixed smooth
    pattern our code generates from ``blend_pattern_seed`` (BackdoorBench's hello_kitty.jpeg is not ours to ship).
    Alphas 0.2 for train and test, as BackdoorBench."""

    attack: str = "blended"
    attack_trigger_img_path: str | None = None
    attack_train_blended_alpha: float = 0.2
    attack_test_blended_alpha: float = 0.2
    blend_pattern_seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_range(self, "attack_train_blended_alpha", 0, 1)
        check_range(self, "attack_test_blended_alpha", 0, 1)


@ATTACKS.register("blended")
class Blended(Attack):
    """Blended: ``(1 - a) x + a * trigger`` with a = 0.2, the trigger a fixed image."""

    config_class = BlendedConfig

    def prepare_trigger(self) -> None:
        h, w, c = self.spec.input_shape
        if self.config.attack_trigger_img_path:
            self.trigger = load_image(self.resolve_path("attack_trigger_img_path"), h, w, c)
        else:
            self.trigger = default_blend_pattern(h, w, c, seed=self.config.blend_pattern_seed)

    def apply_trigger(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        alpha = self.config.attack_train_blended_alpha if train else self.config.attack_test_blended_alpha
        return blend(images, self.trigger, alpha)
