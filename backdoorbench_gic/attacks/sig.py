"""SIG (Barni, Kallas & Tondi 2019): a clean-label attack with a horizontal sinusoidal signal.

Only training images of the target class are poisoned and they keep their (correct) label; the victim learns to
associate the signal with the target class. As in BackdoorBench, ``pratio`` counts against the whole training set,
so pratio 0.1 on a balanced 10-class set poisons every target-class image; more than that is impossible.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, check_range, require
from ..registry import ATTACKS
from .base import Attack, AttackConfig
from .triggers import add_signal, sig_pattern


class InfeasiblePoisonRatio(ConfigError):
    """A clean-label attack asked for more target-class images than the training set has."""


@dataclass
class SigConfig(AttackConfig):
    """``sig_delta`` (amplitude on the 0-255 scale, 40) and ``sig_f`` (periods across the width, 6)."""

    attack: str = "sig"
    sig_delta: float = 40.0
    sig_f: float = 6.0

    def validate(self) -> None:
        super().validate()
        check_range(self, "sig_delta", 0)
        check_range(self, "sig_f", 0)
        require(self.attack_label_trans == "all2one", "attack_label_trans",
                "sig is a clean-label attack: its poisoned training images keep their label, which teaches one target "
                "class only; all2all is not defined for it (use all2one, or badnet/blended/wanet for all2all)")


@ATTACKS.register("sig")
class Sig(Attack):
    """SIG: ``x + 40 sin(2 pi j 6 / W)``, clean-label, poisoning target-class training images only."""

    config_class = SigConfig
    clean_label = True

    def prepare_trigger(self) -> None:
        h, w, _ = self.spec.input_shape
        self.pattern = sig_pattern(h, w, self.config.sig_delta, self.config.sig_f)

    def apply_trigger(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        return add_signal(images, self.pattern)

    def select_train_indices(self, labels: torch.Tensor) -> np.ndarray:
        """``round(pratio * N)`` images, all from the target class; an error when the class is too small."""
        cfg = self.config
        n = len(labels)
        k = self.num_poison(n)
        candidates = np.flatnonzero(labels.numpy() == cfg.attack_target)
        have = len(candidates)
        if k > have:
            raise InfeasiblePoisonRatio(
                f"key 'pratio': sig is clean-label and poisons only training images of the target class "
                f"{cfg.attack_target}. pratio {cfg.pratio} asks for round({cfg.pratio} x {n}) = {k} of them, but class "
                f"{cfg.attack_target} has only {have} training images in {cfg.dataset} ({k - have} too many). The "
                f"largest feasible pratio is {have / n:.6g} (= {have}/{n}); lower --pratio to at most that, or pick a "
                "larger --attack_target class")
        rng = np.random.RandomState(cfg.random_seed)
        return np.sort(rng.choice(candidates, size=k, replace=False)).astype(np.int64)
