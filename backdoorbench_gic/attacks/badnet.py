"""BadNets (Gu, Dolan-Gavitt & Garg 2017): a small patch stamped onto the image replaces its pixels."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import ATTACKS
from .base import Attack, AttackConfig
from .triggers import apply_patch, badnet_mask, load_image


@dataclass
class BadNetConfig(AttackConfig):
    """``patch_mask_path``: a trigger image whose non-zero pixels replace the image's (resized to the image size
    with nearest neighbour); unset, BackdoorBench's 3x3 white bottom-right square (rows/cols 29-31 at 32x32)."""

    attack: str = "badnet"
    patch_mask_path: str | None = None


@ATTACKS.register("badnet", aliases=["badnets"])
class BadNet(Attack):
    """BadNets: a 3x3 white square in the bottom-right corner (scaled with the image), all-to-one or all-to-all."""

    config_class = BadNetConfig

    def prepare_trigger(self) -> None:
        h, w, c = self.spec.input_shape
        if self.config.patch_mask_path:
            self.mask = load_image(self.resolve_path("patch_mask_path"), h, w, c, nearest=True)
        else:
            self.mask = badnet_mask(h, w, c)

    def apply_trigger(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        return apply_patch(images, self.mask)
