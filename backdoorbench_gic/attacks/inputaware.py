"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): every image gets its own trigger.

A pattern generator G and a mask generator M (small convolutional encoder-decoders) map an image x to a pattern
G(x) in [0, 1] and a mask m(x) in [0, 1]; the poisoned image is ``x + m(x) * (G(x) - x)``.

1. M is trained alone first (``mask_epochs``): its mask's mean is pushed below ``mask_density`` (weight
   ``lambda_norm``) while the diversity term ``||x - x'|| / ||m(x) - m(x')||`` keeps masks of different images apart.
   M is then frozen.
2. G and the classifier train together. In every batch a ``pratio`` share is poisoned with its own trigger and
   relabelled (backdoor mode), a further ``cross_ratio * pratio`` share is poisoned with the trigger generated from
   *another* image of the batch and keeps its label (cross-trigger mode: a trigger works only on the image it was
   made for), the rest stays clean. The loss is cross-entropy over the batch plus ``lambda_div`` times the diversity
   term ``||x - x'|| / ||G(x) - G(x')||`` on the backdoor images and the images whose triggers the cross samples
   borrowed. G is updated by Adam (``lr_G``), the classifier by the run's optimizer.

As for WaNet (and BackdoorBench's inputaware), bd_train is materialised after training: ``round(pratio * N)``
poisoned, relabelled samples plus ``cross_ratio`` times as many cross-trigger samples that keep their label.
``cross_test_dataset/`` holds the test set in cross-trigger mode and ``input_aware_generators.pt`` (ours) the
generators' weights, so the triggers can be regenerated later. Our CPU-scale differences: the generators'
width (``generator_width``) and the number of mask epochs are settings, and WaNet's extra post-poisoning
crop/rotation is not applied (the run's own random crop is, before poisoning). The generators normalise per sample
(GroupNorm with one group) rather than with BatchNorm: a batch holds only about a dozen poisoned images, and with
BatchNorm the trigger a trained generator makes in eval mode (running statistics) differed from the one the
classifier learnt; on a 10,000-image, 4-epoch Fashion-MNIST screen the held-out ASR went from 15 % to 67 %.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from ..utils.progress import progress_bar

from ..config import check_range, require
from ..data.imageset import ImageSet
from ..records import PoisonedSplit, write_poisoned_split
from ..registry import ATTACKS
from ..training import EpochStats
from ..utils.io import atomic_torch_save
from ..utils.logs import progress_enabled
from ..utils.runtime import to_device
from .base import Attack, AttackConfig, poisoned_view
from .triggers import _to_uint8

log = logging.getLogger(__name__)

GEN_SEED_OFFSET = 15485863  # the generators' initialisation, apart from index selection and the victim's init
CROSS_SEED_OFFSET = 104729
CHUNK = 1024  # images sent through the generators at once when whole sets are poisoned
GENERATORS_FILE = "input_aware_generators.pt"
EPS = 1e-7  # keeps the diversity ratio finite when two triggers coincide


@dataclass
class InputAwareConfig(AttackConfig):
    """BackdoorBench's ``config/attack/inputaware/default.yaml`` keys where they exist (lr_G / lr_M 0.01 with Adam
    betas (0.5, 0.9), lambda_div 1, lambda_norm 100, mask_density 0.032, cross_ratio 1 (the paper's
    p_cross = p_attack)); ``mask_epochs`` (the paper pre-trains M for 25) and ``generator_width`` are ours."""

    attack: str = "inputaware"
    lr_G: float = 0.01
    lr_M: float = 0.01
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_density: float = 0.032
    cross_ratio: float = 1.0
    mask_epochs: int = 25
    generator_width: int = 16

    def validate(self) -> None:
        super().validate()
        check_range(self, "lr_G", 0, lo_open=True)
        check_range(self, "lr_M", 0, lo_open=True)
        check_range(self, "lambda_div", 0)
        check_range(self, "lambda_norm", 0)
        check_range(self, "mask_density", 0, 1, lo_open=True)
        check_range(self, "cross_ratio", 0)
        check_range(self, "mask_epochs", 0)
        check_range(self, "generator_width", 1)
        require(self.pratio * (1 + self.cross_ratio) <= 1, "pratio",
                f"Input-aware poisons pratio x (1 + cross_ratio) = {self.pratio * (1 + self.cross_ratio):.4g} of "
                "each batch, more than all of it; lower pratio or cross_ratio")


class TriggerGenerator(nn.Module):
    """Encoder-decoder: two stride-2 poolings down, two bilinear upsamplings back (sizes divisible by 4 need no
    cropping; others are resized back at the end). ``out`` channels in [0, 1]; ``sharp`` squashes the output
    towards 0/1 (the mask generator's threshold in the paper)."""

    def __init__(self, channels: int, out: int, width: int = 16, sharp: float = 1.0):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            # per-sample normalisation: a trigger does not depend on which images share its batch, so training
            # (a dozen poisoned images per batch) and poisoning whole sets make the same trigger
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(1, cout), nn.ReLU(inplace=True))

        w = width
        self.enc1 = nn.Sequential(block(channels, w), block(w, w))
        self.enc2 = nn.Sequential(block(w, 2 * w), block(2 * w, 2 * w))
        self.mid = block(2 * w, 2 * w)
        self.dec2 = block(2 * w, w)
        self.dec1 = block(w, w)
        self.head = nn.Conv2d(w, out, 3, padding=1)
        self.sharp = float(sharp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        h = F.max_pool2d(self.enc1(x), 2)
        h = F.max_pool2d(self.enc2(h), 2)
        h = self.mid(h)
        h = self.dec2(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False))
        h = self.dec1(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False))
        h = self.head(h)
        if h.shape[-2:] != size:
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
        return torch.tanh(self.sharp * h) / 2 + 0.5


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """The paper's diversity term, per pair then averaged: ``rms(x1 - x2) / (rms(t1 - t2) + eps)``; small when
    different images get different triggers."""
    dx = (x1 - x2).pow(2).flatten(1).mean(1).sqrt()
    dt = (t1 - t2).pow(2).flatten(1).mean(1).sqrt()
    return (dx / (dt + EPS)).mean()


def compose(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x + mask * (pattern - x)``: the pattern where the mask is 1, the image where it is 0."""
    return x + mask * (pattern - x)


@ATTACKS.register("inputaware", aliases=["input_aware", "input-aware"])
class InputAware(Attack):
    """Input-aware dynamic backdoor: a generated, sample-specific trigger learnt with the victim."""

    config_class = InputAwareConfig
    writes_poison_index_list = False
    dynamic_trigger = True  # the trigger changes while training: bd_test is regenerated for every evaluation

    def prepare_trigger(self) -> None:
        cfg = self.config
        h, w, c = self.spec.input_shape
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.random_seed + GEN_SEED_OFFSET)
        self.netG = TriggerGenerator(c, c, cfg.generator_width)
        self.netM = TriggerGenerator(c, 1, cfg.generator_width, sharp=20.0)  # the paper's tanh(20 x) threshold
        torch.random.set_rng_state(torch_state)
        self.netG.eval()
        self.netM.eval()

    # -- the trigger -------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.netG.parameters()).device

    @torch.no_grad()
    def _poison_float(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Float [0,1] images poisoned with the triggers generated from ``source`` (default: themselves)."""
        src = x if source is None else source
        return compose(x, self.netG(src), self.netM(src)).clamp(0, 1)

    def _poison_uint8(self, images: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """uint8 in, uint8 out, in chunks; ``shift`` > 0: each image gets the trigger of the image ``shift`` places
        further on in its chunk (cross-trigger mode)."""
        if not len(images):
            return images
        self.netG.eval()
        self.netM.eval()
        dev = self._device()
        out = []
        for part in images.split(CHUNK):
            x = part.to(dev).float() / 255.0
            src = x.roll(-shift, 0) if shift and len(x) > 1 else None
            out.append(_to_uint8(self._poison_float(x, src) * 255.0).cpu())
        return torch.cat(out)

    def apply_trigger(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        return self._poison_uint8(images)

    def apply_cross(self, images: torch.Tensor) -> torch.Tensor:
        """Cross-trigger mode: every image carries the trigger generated from its neighbour in the batch."""
        return self._poison_uint8(images, shift=1)

    def counts(self, n: int) -> tuple[int, int]:
        n_bd = int(round(self.config.pratio * n))
        return n_bd, min(int(round(self.config.cross_ratio * n_bd)), n - n_bd)

    # -- training ------------------------------------------------------------------------------------------------
    def poison_train(self, train: ImageSet) -> tuple[ImageSet, PoisonedSplit | None]:
        return train, None  # poisoned per batch by the generator; bd_train is materialised after training

    def prepare_training(self, train: ImageSet, device: torch.device, generator: torch.Generator,
                         progress: bool | None = None) -> Callable[..., EpochStats]:
        """Pre-train the mask generator, then return the joint epoch (classifier + pattern generator)."""
        self._ensure_setup()
        cfg = self.config
        self.netG.to(device)
        self.netM.to(device)
        if cfg.mask_epochs:
            self._train_mask(train, device, generator, progress)
        self.netM.eval()
        for p in self.netM.parameters():
            p.requires_grad_(False)
        self.optG = torch.optim.Adam(self.netG.parameters(), lr=cfg.lr_G, betas=(0.5, 0.9))
        return self._joint_epoch

    def _train_mask(self, train: ImageSet, device: torch.device, generator: torch.Generator,
                    progress: bool | None) -> None:
        cfg = self.config
        opt = torch.optim.Adam(self.netM.parameters(), lr=cfg.lr_M, betas=(0.5, 0.9))
        self.netM.train()
        t0 = time.time()
        for epoch in range(cfg.mask_epochs):
            total_norm, total_div, batches = 0.0, 0.0, 0
            it = train.batches(cfg.batch_size, shuffle=True, generator=generator, device=device)
            n_batches = (len(train) + cfg.batch_size - 1) // cfg.batch_size
            for batch in progress_bar(it, total=n_batches, desc=f"mask {epoch + 1}/{cfg.mask_epochs}", leave=False,
                                      disable=not progress_enabled(progress)):
                x = to_device(batch.x, device)
                if len(x) < 2:
                    continue
                m1 = self.netM(x)  # pairs (x_i, x_{i-1}) of the batch: one forward pass serves both sides
                div = diversity_loss(x, x.roll(1, 0), m1, m1.roll(1, 0))
                norm = F.relu(m1.mean() - cfg.mask_density)
                loss = cfg.lambda_div * div + cfg.lambda_norm * norm
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total_norm += float(m1.detach().mean())
                total_div += float(div.detach())
                batches += 1
            log.info("input-aware mask epoch %d/%d: mean mask %.4f (target %.4f), diversity %.4f (%.1fs)", epoch + 1,
                     cfg.mask_epochs, total_norm / max(batches, 1), cfg.mask_density, total_div / max(batches, 1),
                     time.time() - t0)

    def _joint_epoch(self, model: torch.nn.Module, data: ImageSet, optimizer: torch.optim.Optimizer, *,
                     device: torch.device, batch_size: int, generator: torch.Generator, augment: Callable | None = None,
                     amp: bool = True, progress: bool | None = None, desc: str = "train", **_: object) -> EpochStats:
        """One pass: backdoor, cross-trigger and clean samples in every batch; classifier and G step together."""
        cfg = self.config
        model.train()
        self.netG.train()
        total_loss, batches, correct, seen = 0.0, 0, 0, 0
        it = data.batches(batch_size, shuffle=True, generator=generator, augment=augment, device=device)
        n_batches = (len(data) + batch_size - 1) // batch_size
        for batch in progress_bar(it, total=n_batches, desc=desc, leave=False, disable=not progress_enabled(progress)):
            x, y = to_device(batch.x, device), batch.y.to(device)
            n_bd, n_cross = self.counts(len(y))
            n_div = min(n_bd, len(y) - n_bd)  # pairs for the diversity term: x_i against x_{n_bd + i}
            parts, loss_div = [], torch.zeros((), device=device)
            if n_bd:
                xb = x[:n_bd]
                gb = self.netG(xb)
                parts.append(compose(xb, gb, self.netM(xb)))
                if n_div and cfg.lambda_div:
                    xo = x[n_bd:n_bd + n_div]
                    loss_div = diversity_loss(xb[:n_div], xo, gb[:n_div], self.netG(xo))
            if n_cross:
                xc = x[n_bd:n_bd + n_cross]
                src = xc.roll(1, 0) if n_cross > 1 else x[:1]  # another image's trigger
                parts.append(compose(xc, self.netG(src), self.netM(src)))
            parts.append(x[n_bd + n_cross:])
            inputs = torch.cat(parts)
            targets = torch.cat([self.target_labels(y[:n_bd]), y[n_bd:]])
            logits = model(inputs)
            ce = F.cross_entropy(logits.float(), targets)
            loss = ce + cfg.lambda_div * loss_div
            optimizer.zero_grad(set_to_none=True)
            self.optG.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.optG.step()
            total_loss += float(ce.detach())
            batches += 1
            correct += int((logits.detach().argmax(1) == targets).sum())
            seen += len(targets)
        self.netG.eval()
        return EpochStats(total_loss / max(batches, 1), correct / max(seen, 1), seen)

    # -- after training ----------------------------------------------------------------------------------------
    def materialize_bd_train(self, train: ImageSet) -> PoisonedSplit:
        """round(pratio N) poisoned, relabelled samples from all classes, plus cross_ratio times as many
        cross-trigger samples drawn from the rest, which keep their labels."""
        self._ensure_setup()
        n = len(train)
        bd_idx = self.select_train_indices(train.labels)
        _, n_cross = self.counts(n)
        rest = np.setdiff1d(np.arange(n), bd_idx)
        rng = np.random.RandomState(self.config.random_seed + CROSS_SEED_OFFSET)
        cross_idx = np.sort(rng.choice(rest, size=n_cross, replace=False)).astype(np.int64)
        idx = np.concatenate([bd_idx, cross_idx])
        images = torch.cat([self.apply_trigger(train.images[bd_idx], train=True),
                            self.apply_cross(train.images[cross_idx])])
        labels = torch.cat([self.train_labels(train.labels[bd_idx]), train.labels[cross_idx]])
        order = np.argsort(idx, kind="stable")
        _, split = poisoned_view(train, idx[order], images[torch.from_numpy(order)], labels[torch.from_numpy(order)],
                                 np.arange(n, dtype=np.int64), "bd_train")
        return split

    def generator_state(self) -> dict:
        """What regenerates the triggers: both generators' weights and their architecture keys."""
        return {"netG": {k: v.detach().cpu() for k, v in self.netG.state_dict().items()},
                "netM": {k: v.detach().cpu() for k, v in self.netM.state_dict().items()},
                "generator_width": self.config.generator_width, "channels": self.spec.input_shape[2]}

    def load_generators(self, state: dict) -> None:
        """Restore the generators written by :meth:`write_extras` (``input_aware_generators.pt``)."""
        self._ensure_setup()
        self.netG.load_state_dict(state["netG"])
        self.netM.load_state_dict(state["netM"])
        self.netG.eval()
        self.netM.eval()

    def write_extras(self, record_dir: Path, record_name: str, test: ImageSet) -> list[Path]:
        """``cross_test_dataset/<label>/<index>.png`` (the test set in cross-trigger mode) and the generators."""
        self._ensure_setup()
        idx = np.arange(len(test), dtype=np.int64)
        _, split = poisoned_view(test, idx, self.apply_cross(test.images), test.labels.clone(), idx, "cross_test")
        write_poisoned_split(split, self.bb_root, record_name, "cross_test_dataset")
        path = record_dir / GENERATORS_FILE
        atomic_torch_save(self.generator_state(), path)
        return [record_dir / "cross_test_dataset", path]

    def load_extras(self, record_dir) -> "InputAware":
        self.load_generators(torch.load(Path(record_dir) / GENERATORS_FILE, map_location="cpu", weights_only=True))
        return self
