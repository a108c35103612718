"""FT-SAM: fine-tuning with sharpness-aware minimisation at a large radius.

Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization"
(ICCV 2023). Backdoor neurons have large weight norms; minimising the loss under a worst-case weight
perturbation of a *large* radius (much larger than SAM's usual 0.05) shrinks them and moves the model out of
the backdoored basin, which plain fine-tuning does not.

The update (BackdoorBench's keys): at weights ``w`` take the gradient ``g`` of the label-smoothed
cross-entropy (``label_smoothing``, 0.1); move to ``w + e`` with

    e = rho * T^2 g / ||T g||,   T = |w| elementwise if ``adaptive`` (ASAM, Kwon et al. 2021), else T = 1;

take the gradient ``g_adv`` there, return to ``w`` and step the base optimizer (SGD) with

    g_adv - alpha * g_perp,   g_perp = g - (<g, g_adv> / ||g_adv||^2) g_adv

(the surrogate-gap term of GSAM, Zhuang et al. 2022; ``alpha`` 0 is plain (A)SAM, BackdoorBench's default).
``rho`` follows the learning rate linearly from ``rho_max`` (at ``lr``) to ``rho_min`` (at lr 0), as GSAM's
scheduler does; BackdoorBench's defaults set both to 2.0, so the radius is constant. BatchNorm running
statistics are updated by the first forward pass only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_range, require
from ..data.imageset import Batch
from ..registry import DEFENSES
from ..utils.runtime import autocast, to_device
from ._common import freeze_bn_stats, restore_bn_stats
from .base import Defense, DefenseConfig, Run



@dataclass
class FTSAMConfig(DefenseConfig):
    epochs: int = 100
    rho_max: float = 2.0
    rho_min: float = 2.0
    alpha: float = 0.0
    adaptive: bool = True
    label_smoothing: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_range(self, "rho_max", 0)
        check_range(self, "rho_min", 0)
        require(self.rho_min <= self.rho_max, "rho_min", f"must be <= rho_max ({self.rho_max}), got {self.rho_min}")
        check_range(self, "alpha", 0)
        check_range(self, "label_smoothing", 0, 1)
        require(self.label_smoothing < 1, "label_smoothing", f"must be < 1, got {self.label_smoothing}")


class SAMStep:
    """One (adaptive, surrogate-gap-guided) SAM update of ``params`` through ``base`` optimizer."""

    def __init__(self, params, base: torch.optim.Optimizer, *, adaptive: bool, alpha: float, eps: float = 1e-12):
        self.params = [p for p in params if p.requires_grad]
        self.base = base
        self.adaptive = adaptive
        self.alpha = alpha
        self.eps = eps

    @torch.no_grad()
    def perturbation(self, rho: float) -> list[torch.Tensor | None]:
        """``e = rho * T^2 g / ||T g||`` for the gradients currently stored in ``.grad``."""
        scaled = [(p.abs() * p.grad if self.adaptive else p.grad).float() for p in self.params if p.grad is not None]
        if not scaled:
            return [None] * len(self.params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = rho / (norm + self.eps)
        out = []
        for p in self.params:
            if p.grad is None:
                out.append(None)
                continue
            t2 = p.pow(2) if self.adaptive else 1.0
            out.append((t2 * p.grad * scale).to(p.dtype))
        return out

    def step(self, closure, rho: float) -> torch.Tensor:
        """``closure()`` computes the loss and calls backward; returns the loss at the unperturbed weights."""
        self.base.zero_grad(set_to_none=True)
        loss = closure(first=True)
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        e = self.perturbation(rho)
        with torch.no_grad():
            for p, ei in zip(self.params, e):
                if ei is not None:
                    p.add_(ei)
        self.base.zero_grad(set_to_none=True)
        closure(first=False)
        with torch.no_grad():
            for p, ei in zip(self.params, e):
                if ei is not None:
                    p.sub_(ei)
            if self.alpha > 0:
                self._surrogate_gap(grads)
        self.base.step()
        return loss

    @torch.no_grad()
    def _surrogate_gap(self, grads: list[torch.Tensor | None]) -> None:
        """``p.grad <- g_adv - alpha * (g - proj_{g_adv} g)`` (GSAM's ascent on the surrogate gap)."""
        pairs = [(p, g) for p, g in zip(self.params, grads) if p.grad is not None and g is not None]
        inner = sum((p.grad.float() * g.float()).sum() for p, g in pairs)
        adv_sq = sum(p.grad.float().pow(2).sum() for p, _ in pairs)
        coef = inner / (adv_sq + self.eps)
        for p, g in pairs:
            g_perp = g - coef * p.grad
            p.grad.sub_(self.alpha * g_perp)


@DEFENSES.register("ft-sam", aliases=["ft_sam", "d-sam"])
class FTSAM(Defense):
    """Fine-tuning with adaptive sharpness-aware minimisation at a large radius (Zhu et al., ICCV 2023)."""

    config_class = FTSAMConfig
    csv_prefix = "d-sam"
    augment = True

    def rho_at(self, lr_now: float) -> float:
        cfg = self.config
        if cfg.lr <= 0 or cfg.rho_max == cfg.rho_min:
            return cfg.rho_max
        frac = min(max(lr_now / cfg.lr, 0.0), 1.0)
        return cfg.rho_min + (cfg.rho_max - cfg.rho_min) * frac

    def build_optimizer(self, run: Run) -> torch.optim.Optimizer:
        base = super().build_optimizer(run)
        run.sam = SAMStep(run.net.parameters(), base, adaptive=self.config.adaptive, alpha=self.config.alpha)
        return base

    def start_epoch(self, run: Run, epoch: int) -> None:
        run.rho = self.rho_at(run.optimizer.param_groups[0]["lr"])

    def step(self, run: Run, net: torch.nn.Module, batch: Batch):
        cfg = self.config
        x, y = to_device(batch.x, run.device), batch.y
        out = {}

        def closure(first: bool):
            saved = [] if first else freeze_bn_stats(net)
            try:
                with autocast(run.device, cfg.amp):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                loss.backward()
            finally:
                restore_bn_stats(saved)
            if first:
                out["logits"] = logits.detach()
            return loss.detach()

        loss = run.sam.step(closure, run.rho)
        return loss, out["logits"]

    def end_epoch(self, run: Run, epoch: int, stats) -> str:
        return f"rho {run.rho:.3g}"

    def finish(self, run: Run) -> dict:
        return {"rho_last": self.rho_at(run.optimizer.param_groups[0]["lr"])}
