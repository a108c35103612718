"""FST: feature shift tuning.

Min, Chen, Zhong, Lu, "Towards Stable Backdoor Purification through Feature Shift Tuning" (NeurIPS 2023).
Plain fine-tuning with few clean samples barely moves the features away from the backdoored ones when the
poisoning rate is low; FST forces the shift by *re-initialising* the classification head and penalising its
alignment with the original (backdoored) head while tuning the whole network:

    min_{theta, w}  CE(w . phi_theta(x) + b, y) + alpha * <w, w_ori>    s.t.  ||w||_2 = ||w_ori||_2

``<w, w_ori>`` is the Frobenius inner product of the head weights (the bias is free and unpenalised). The
new head is drawn like a fresh ``nn.Linear`` (uniform in +-1/sqrt(fan_in), from the seeded generator) and
rescaled to the original head's norm; the norm constraint is kept by projecting the head weight back onto the
sphere before every step (``head_norm_constraint``; without it the penalty alone rewards growing ``w`` along
``-w_ori``). BackdoorBenchER's defaults: SGD lr 0.01 momentum 0.9 wd 5e-4, cosine, 100 epochs, batch 256,
``alpha`` 0.2 (gtsrb 0.1, cifar100 and tiny 0.001), no augmentation. Works with any model whose head
:func:`~backdoorbench_gic.models.head_of` finds (``linear`` or a declared ``head_name``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import check_range
from ..data.imageset import ImageSet
from ..data.transforms import TrainAugment
from ..registry import DEFENSES
from ..training import make_optimizer, make_scheduler, step_scheduler, train_epoch
from ..utils.logs import progress_enabled
from ._common import classifier_head, history_row, make_seeded_generator
from .base import Defense, DefenseConfig, Monitor, PurifyResult

log = logging.getLogger(__name__)


@dataclass
class FSTConfig(DefenseConfig):
    epochs: int = 100
    alpha: float = 0.2
    head_norm_constraint: bool = True  # ours: keep ||w|| = ||w_ori|| (the paper's constraint)

    def validate(self) -> None:
        super().validate()
        check_range(self, "alpha", 0)


@torch.no_grad()
def reinit_head(head: torch.nn.Linear, generator: torch.Generator) -> torch.Tensor:
    """Redraw ``head`` in place like a fresh ``nn.Linear`` and rescale its weight to the old weight's norm;
    returns a copy of the old weight (``w_ori``)."""
    w_ori = head.weight.detach().clone()
    fan_in = head.weight.shape[1]
    bound = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(head.weight.shape, generator=generator) * 2 - 1) * bound
    w = w * (w_ori.float().norm().cpu() / w.norm().clamp_min(1e-12))
    head.weight.copy_(w.to(head.weight.device, head.weight.dtype))
    if head.bias is not None:
        b = (torch.rand(head.bias.shape, generator=generator) * 2 - 1) * bound
        head.bias.copy_(b.to(head.bias.device, head.bias.dtype))
    return w_ori


@DEFENSES.register("fst", aliases=["feature-shift-tuning"])
class FST(Defense):
    """Feature shift tuning: re-initialised head, penalised alignment with the backdoored head (Min et al. 2023)."""

    config_class = FSTConfig
    csv_prefix = "fst"
    augment = False

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device,
               train_augment: TrainAugment | None = None, monitor: Monitor | None = None,
               progress: bool | None = None) -> PurifyResult:
        cfg = self.config
        gen = make_seeded_generator(cfg.random_seed)
        net = self.copy_model(model, device)
        head = classifier_head(net)
        w_ori = reinit_head(head, gen)
        radius = float(w_ori.float().norm())
        log.info("%s: head re-initialised at the original norm %.4f", self.name, radius)

        def alignment() -> float:
            return float((head.weight.detach().float() * w_ori.float()).sum())

        def penalised_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, y) + cfg.alpha * (head.weight.float() * w_ori.float()).sum()

        @torch.no_grad()
        def project_head():
            if cfg.head_norm_constraint:
                head.weight.mul_(radius / head.weight.float().norm().clamp_min(1e-12))

        def before_step(batch):  # the previous step's projection, taken before this step's forward pass
            project_head()
            return batch

        optimizer = make_optimizer(net.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg, cfg.epochs)
        augment = self.augment_fn(train_augment)
        history = []
        for epoch in tqdm(range(cfg.epochs), desc=self.name, disable=not progress_enabled(progress)):
            stats = train_epoch(net, aux, optimizer, device=device, batch_size=cfg.batch_size, generator=gen,
                                augment=augment, amp=cfg.amp, loss_fn=penalised_ce, batch_hook=before_step,
                                progress=progress, desc=f"{self.name} epoch {epoch}")
            project_head()
            step_scheduler(scheduler, stats.loss)
            history.append(history_row(epoch, stats.loss, stats.acc, net, monitor))
            log.info("%s epoch %d/%d: loss %.4f, train acc %.4f, <w, w_ori> %.4f", self.name, epoch + 1, cfg.epochs,
                     stats.loss, stats.acc, alignment())
        net.eval()
        # head_alignment: <w, w_ori> / ||w_ori||^2, the cosine to the backdoored head while ||w|| is constrained
        extras = {"head_norm": radius, "head_alignment": alignment() / max(radius ** 2, 1e-12)}
        return PurifyResult(net, history, extras)
