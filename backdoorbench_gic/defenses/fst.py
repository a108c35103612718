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
``alpha`` 0.2 (gtsrb 0.1, cifar100 and tiny 0.001), no augmentation. Only the head's weight is redrawn and the
backdoored bias stays (``head_bias: keep``), as BackdoorBenchER's fst.py does (``defense/fst.py:233-235``); the
paper re-initialises "the linear head" without saying more. ``head_bias: redraw`` draws the bias too, like a fresh
``nn.Linear``: what this package did until 2026-12-08 (every FST result in BENCHMARKS.md before then; the tuned
domain yamls keep it). Works with any model whose head
:func:`~backdoorbench_gic.models.head_of` finds (``linear`` or a declared ``head_name``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import check_range
from ..data.imageset import Batch
from ..registry import DEFENSES
from ._common import classifier_head
from .base import Defense, DefenseConfig, Run



@dataclass
class FSTConfig(DefenseConfig):
    epochs: int = 100
    alpha: float = 0.2
    head_norm_constraint: bool = True  # ours: keep ||w|| = ||w_ori|| (the paper's constraint)
    head_bias: Literal["keep", "redraw"] = "keep"  # BackdoorBenchER's fst.py: the backdoored bias stays

    def validate(self) -> None:
        super().validate()
        check_range(self, "alpha", 0)


@torch.no_grad()
def reinit_head(head: torch.nn.Linear, generator: torch.Generator, keep_bias: bool = False) -> torch.Tensor:
    """Redraw ``head`` in place like a fresh ``nn.Linear`` (its bias too unless ``keep_bias``) and rescale its
    weight to the old weight's norm; returns a copy of the old weight (``w_ori``)."""
    w_ori = head.weight.detach().clone()
    fan_in = head.weight.shape[1]
    bound = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(head.weight.shape, generator=generator) * 2 - 1) * bound
    w = w * (w_ori.float().norm().cpu() / w.norm().clamp_min(1e-12))
    head.weight.copy_(w.to(head.weight.device, head.weight.dtype))
    if head.bias is not None and not keep_bias:
        b = (torch.rand(head.bias.shape, generator=generator) * 2 - 1) * bound
        head.bias.copy_(b.to(head.bias.device, head.bias.dtype))
    return w_ori


@DEFENSES.register("fst", aliases=["feature-shift-tuning"])
class FST(Defense):
    """Feature shift tuning: re-initialised head, penalised alignment with the backdoored head (Min et al. 2023)."""

    config_class = FSTConfig
    augment = False

    def setup(self, run: Run) -> None:
        run.head = classifier_head(run.net)
        run.w_ori = reinit_head(run.head, run.generator, keep_bias=self.config.head_bias == "keep").float()
        run.radius = float(run.w_ori.norm())

    @torch.no_grad()
    def project_head(self, run: Run) -> None:
        if self.config.head_norm_constraint:
            run.head.weight.mul_(run.radius / run.head.weight.float().norm().clamp_min(1e-12))

    def alignment(self, run: Run) -> float:
        """``<w, w_ori>``"""
        return float((run.head.weight.detach().float() * run.w_ori).sum())

    def step(self, run: Run, net: torch.nn.Module, batch: Batch):
        self.project_head(run)  # the previous step's projection, taken before this step's forward pass
        return super().step(run, net, batch)

    def loss(self, run: Run, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y) + self.config.alpha * (run.head.weight.float() * run.w_ori).sum()

    def end_epoch(self, run: Run, epoch: int, stats) -> str:
        self.project_head(run)
        return f"<w, w_ori> {self.alignment(run):.4f}"

    def finish(self, run: Run) -> dict:
        # head_alignment: <w, w_ori> / ||w_ori||^2, the cosine to the backdoored head while ||w|| is constrained
        return {"head_norm": run.radius, "head_alignment": self.alignment(run) / max(run.radius ** 2, 1e-12)}
