"""FT: plain fine-tuning of the whole victim on the clean auxiliary set (BackdoorBench's ``ft``).

The baseline every other purification is measured against: cross-entropy, SGD lr 0.01 momentum 0.9 wd 5e-4,
CosineAnnealingLR, 100 epochs, batch 256, with the dataset's train augmentation (BackdoorBench applies its
train transform to ft's clean subset). Tiny-ImageNet: 200 epochs with ReduceLROnPlateau.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.imageset import ImageSet
from ..data.transforms import TrainAugment
from ..registry import DEFENSES
from ..training import make_optimizer, make_scheduler, step_scheduler, train_epoch
from ..utils.logs import progress_enabled
from ._common import history_row, make_seeded_generator
from .base import Defense, DefenseConfig, Monitor, PurifyResult

log = logging.getLogger(__name__)


@dataclass
class FTConfig(DefenseConfig):
    """BackdoorBench's ft keys (all common ones); only the epoch count differs from the shared defaults."""

    epochs: int = 100


@DEFENSES.register("ft", aliases=["finetune", "fine-tuning"])
class FT(Defense):
    """Fine-tuning on the auxiliary set (cross-entropy, train augmentation)."""

    config_class = FTConfig
    csv_prefix = "ft"
    augment = True

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device,
               train_augment: TrainAugment | None = None, monitor: Monitor | None = None,
               progress: bool | None = None) -> PurifyResult:
        cfg = self.config
        gen = make_seeded_generator(cfg.random_seed)
        net = self.copy_model(model, device)
        optimizer = make_optimizer(net.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg, cfg.epochs)
        augment = self.augment_fn(train_augment)
        history = []
        for epoch in tqdm(range(cfg.epochs), desc=self.name, disable=not progress_enabled(progress)):
            stats = train_epoch(net, aux, optimizer, device=device, batch_size=cfg.batch_size, generator=gen,
                                augment=augment, amp=cfg.amp, progress=progress, desc=f"{self.name} epoch {epoch}")
            step_scheduler(scheduler, stats.loss)
            history.append(history_row(epoch, stats.loss, stats.acc, net, monitor))
            log.info("%s epoch %d/%d: loss %.4f, train acc %.4f", self.name, epoch + 1, cfg.epochs, stats.loss,
                     stats.acc)
        net.eval()
        return PurifyResult(net, history)
