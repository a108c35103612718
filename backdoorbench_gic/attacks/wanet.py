"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warping trigger, learnt through training control.

A random k x k control grid of displacements in [-1, 1], normalised to mean magnitude 1 and upsampled
bicubically to the image size, scaled by ``s / size`` and added to the identity sampling grid, is the trigger
(``grid_rescale`` multiplies the result, which is clipped to the image). In every training batch a ``pratio``
share of the samples is warped with it and relabelled, and a further ``cross_ratio * pratio`` share ("noise
mode") is warped with the trigger grid plus per-sample random noise of up to a pixel and keeps its label, so
the network learns that only the exact warp means the target. The batch is then randomly shifted (up to
``random_crop`` pixels) and rotated (up to ``random_rotation`` degrees).

As in BackdoorBench, bd_train is materialised after training: ``round(pratio * N)`` warped, relabelled samples
plus ``cross_ratio`` times as many noise-mode samples that keep their label (poisoned_label == original_label),
all flagged in poison_indicator. ``cross_test_dataset/`` holds the whole test set in noise mode, and
``wanet_grids.pt`` (ours) the two grids, so the trigger can be re-applied later.

The defaults are BackdoorBench's, made for long training (BackdoorBench 100 epochs, the reference code 1000): at
s = 0.5 the warp moves pixels by 0.29 px on average, less than the 0.36 px jitter noise mode adds, and the
post-poisoning crop and rotation move the image by more than the warp. Within a few CPU epochs both noise mode and
that augmentation keep the backdoor from being learnt; BENCHMARKS.md ("Attacks") measures each factor and gives
the setting the CPU benchmarks use (s = 4, no noise mode, no extra augmentation).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import check_range, require
from ..data.imageset import Batch, ImageSet
from ..records import PoisonedSplit, write_poisoned_split
from ..registry import ATTACKS
from ..utils.io import atomic_torch_save
from .base import Attack, AttackConfig, poisoned_view
from .triggers import cross_grids, identity_grid, random_crop_rotate, wanet_grid, wanet_noise_grid, warp, warp_uint8

log = logging.getLogger(__name__)

GRID_SEED_OFFSET = 7919  # separates the grid's random stream from index selection and data order
NOISE_SEED_OFFSET = 104729
CHUNK = 4096  # images warped at once when whole sets are poisoned (bounds the memory of per-sample grids)


@dataclass
class WaNetConfig(AttackConfig):
    """BackdoorBench's ``config/attack/wanet/default.yaml`` keys: k 4, s 0.5, grid_rescale 1, cross_ratio 2,
    random_rotation 10, random_crop 5."""

    attack: str = "wanet"
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    random_rotation: float = 10.0
    random_crop: int = 5

    def validate(self) -> None:
        super().validate()
        check_range(self, "k", 2)
        check_range(self, "s", 0)
        check_range(self, "grid_rescale", 0, lo_open=True)
        check_range(self, "cross_ratio", 0)
        check_range(self, "random_rotation", 0, 180)
        check_range(self, "random_crop", 0)
        require(self.pratio * (1 + self.cross_ratio) <= 1, "pratio",
                f"WaNet warps pratio x (1 + cross_ratio) = {self.pratio} x {1 + self.cross_ratio} = "
                f"{self.pratio * (1 + self.cross_ratio):.4g} of the training set, more than all of it; lower pratio "
                "or cross_ratio")


@ATTACKS.register("wanet")
class WaNet(Attack):
    """WaNet: a fixed smooth warp (k 4, s 0.5) learnt with noise-mode cross samples, poisoned per batch."""

    config_class = WaNetConfig
    writes_poison_index_list = False  # BackdoorBench writes it for the BadNets family only

    def prepare_trigger(self) -> None:
        cfg = self.config
        h, w, _ = self.spec.input_shape
        g = torch.Generator().manual_seed(cfg.random_seed + GRID_SEED_OFFSET)
        self.noise_grid = wanet_noise_grid(h, w, cfg.k, g)
        self.grid = wanet_grid(self.noise_grid, cfg.s, cfg.grid_rescale)

    def _noise_generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.random_seed + NOISE_SEED_OFFSET + offset)

    def apply_trigger(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        return torch.cat([warp_uint8(part, self.grid) for part in images.split(CHUNK)]) if len(images) else images

    def apply_cross(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise mode: each image warped with its own perturbed grid (uint8 in, uint8 out)."""
        if not len(images):
            return images
        parts = images.split(CHUNK)
        return torch.cat([warp_uint8(part, cross_grids(self.grid, len(part), generator)) for part in parts])

    def counts(self, n: int) -> tuple[int, int]:
        """(warped-and-relabelled, noise-mode) sample counts for a batch or set of ``n``."""
        n_bd = int(round(self.config.pratio * n))
        n_cross = min(int(round(self.config.cross_ratio * n_bd)), n - n_bd)
        return n_bd, n_cross

    # -- training --------------------------------------------------------------------------------------------
    def poison_train(self, train: ImageSet) -> tuple[ImageSet, PoisonedSplit | None]:
        return train, None  # poisoned per batch; bd_train is materialised after training

    def batch_hook(self, generator: torch.Generator) -> Callable[[Batch], Batch]:
        """Warp and relabel the first pratio share of each (shuffled) batch, noise-warp the next cross share, then
        shift and rotate the whole batch. Uses its own generator, so the data order stays the runner's."""
        self._ensure_setup()
        cfg = self.config
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))

        def hook(batch: Batch) -> Batch:
            n_bd, n_cross = self.counts(len(batch.y))
            x, y, poison = batch.x.clone(), batch.y.clone(), batch.poison.clone()
            x[:n_bd] = warp(x[:n_bd], self.grid)
            y[:n_bd] = self.target_labels(y[:n_bd])
            if n_cross:
                x[n_bd:n_bd + n_cross] = warp(x[n_bd:n_bd + n_cross], cross_grids(self.grid, n_cross, g))
            poison[:n_bd + n_cross] = 1
            x = random_crop_rotate(x, cfg.random_crop, cfg.random_rotation, g)
            return Batch(x, y, batch.index, poison, batch.original, batch.source)

        return hook

    # -- after training ----------------------------------------------------------------------------------------
    def materialize_bd_train(self, train: ImageSet) -> PoisonedSplit:
        """round(pratio N) warped, relabelled samples from all classes, plus cross_ratio times as many noise-mode
        samples drawn from the rest, which keep their labels."""
        self._ensure_setup()
        n = len(train)
        bd_idx = self.select_train_indices(train.labels)
        _, n_cross = self.counts(n)
        rest = np.setdiff1d(np.arange(n), bd_idx)
        rng = np.random.RandomState(self.config.random_seed + NOISE_SEED_OFFSET)
        cross_idx = np.sort(rng.choice(rest, size=n_cross, replace=False)).astype(np.int64)
        idx = np.concatenate([bd_idx, cross_idx])
        images = torch.cat([self.apply_trigger(train.images[bd_idx], train=True),
                            self.apply_cross(train.images[cross_idx], self._noise_generator())])
        labels = torch.cat([self.train_labels(train.labels[bd_idx]), train.labels[cross_idx]])
        order = np.argsort(idx, kind="stable")
        _, split = poisoned_view(train, idx[order], images[torch.from_numpy(order)], labels[torch.from_numpy(order)],
                                 np.arange(n, dtype=np.int64), "bd_train")
        return split

    def write_extras(self, record_dir: Path, record_name: str, test: ImageSet) -> list[Path]:
        """``cross_test_dataset/<label>/<index>.png`` (the test set in noise mode, labels kept) and the grids."""
        self._ensure_setup()
        idx = np.arange(len(test), dtype=np.int64)
        images = self.apply_cross(test.images, self._noise_generator(1))
        _, split = poisoned_view(test, idx, images, test.labels.clone(), idx, "cross_test")
        write_poisoned_split(split, self.bb_root, record_name, "cross_test_dataset")
        grids = record_dir / "wanet_grids.pt"
        h, w, _ = self.spec.input_shape
        atomic_torch_save({"identity_grid": identity_grid(h, w), "noise_grid": self.noise_grid.contiguous(),
                           "grid": self.grid.contiguous(), "k": self.config.k, "s": self.config.s,
                           "grid_rescale": self.config.grid_rescale}, grids)
        return [record_dir / "cross_test_dataset", grids]
