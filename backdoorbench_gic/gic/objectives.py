"""What g is trained to do, through the frozen victim (eval mode).

- ``bn``: BatchNorm-statistics alignment. The victim's running statistics summarise its training data; for
  each BN layer the batch moments of the layer's input on g(x) are compared with the running ones channel by
  channel (:mod:`backdoorbench_gic.bnstats`: symmetric Gaussian KL by default, or the variance-scaled
  2-Wasserstein distance), averaged over channels and then over layers with weights ``uniform``, ``early``,
  ``late`` or an explicit list. It is the same divergence ``bbgic aux-quality`` reports as D_BN, computed per
  batch instead of over the whole set. 0 means the batch looks, layer by layer, like the training data.
- ``ce``: cross-entropy of the victim on g(x) against the auxiliary labels.
- ``infomax``: label-free information maximisation, mean per-sample prediction entropy minus the entropy of
  the batch-mean prediction.
- ``drift``: KL(batch-mean prediction || label prior), a penalty against calibration piling predictions onto
  one class (the backdoor is a short path to its target class).
The statistics come from forward hooks using one fused ``var_mean`` per layer, so a step costs one forward
and one input-gradient backward of the victim plus small per-layer reductions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bnstats import BNBatchStats, NoBatchNormError, dataset_bn_divergence, layer_weights  # noqa: F401


@dataclass
class ObjectiveWeights:
    bn: float = 1.0
    ce: float = 0.0
    infomax: float = 0.0
    drift: float = 0.0

    def validate(self) -> None:
        for k in ("bn", "ce", "infomax", "drift"):
            if getattr(self, k) < 0:
                raise ValueError(f"objective weight {k} must be >= 0, got {getattr(self, k)}")
        if self.bn == self.ce == self.infomax == 0:
            raise ValueError("at least one of the bn, ce and infomax objective weights must be > 0")


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


class GICObjective:
    """Weighted sum of the objectives on a calibrated batch; returns the loss and its parts."""

    def __init__(self, victim: nn.Module, weights: ObjectiveWeights, bn_layer_weights: str | Sequence[float] = "uniform",
                 label_prior: torch.Tensor | None = None, bn_distance: str = "kl"):
        weights.validate()
        self.victim = victim
        self.weights = weights
        self.stats = BNBatchStats(victim, bn_distance) if weights.bn > 0 else None
        self.layer_w = layer_weights(len(self.stats.layers), bn_layer_weights).float() if self.stats else None
        self.label_prior = label_prior

    def __call__(self, x_cal: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.victim(x_cal).float()
        parts: dict[str, torch.Tensor] = {}
        if self.stats is not None:
            d = self.stats.divergences()
            parts["bn"] = (d * self.layer_w.to(d.device)).sum()
        if self.weights.ce > 0:
            if y is None:
                raise ValueError("the ce objective needs auxiliary labels")
            parts["ce"] = F.cross_entropy(logits, y)
        probs = None
        if self.weights.infomax > 0 or self.weights.drift > 0:
            probs = logits.softmax(-1)
        if self.weights.infomax > 0:
            parts["infomax"] = entropy(probs).mean() - entropy(probs.mean(0))
        if self.weights.drift > 0:
            mean_p = probs.mean(0)
            prior = self.label_prior.to(mean_p.device) if self.label_prior is not None else torch.full_like(mean_p, 1 / len(mean_p))
            parts["drift"] = (mean_p * (torch.log(mean_p.clamp_min(1e-12)) - torch.log(prior.clamp_min(1e-12)))).sum()
        loss = sum(getattr(self.weights, k) * v for k, v in parts.items())
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def close(self) -> None:
        if self.stats is not None:
            self.stats.remove()
