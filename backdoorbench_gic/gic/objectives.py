"""What g is trained to do, through the frozen victim (eval mode).

- ``bn``: BatchNorm-statistics alignment. The victim's running statistics summarise its training data; for
  each BN layer l and channel c we compare the batch mean/std of the layer's input on g(x) with the running
  ones through the 2-Wasserstein distance of the two 1-D Gaussians, scaled by the running variance so layers
  of any scale weigh alike:
      d_l = mean_c [ (mu_c - mu^_c)^2 + (sigma_c - sigma^_c)^2 ] / (sigma^_c^2 + eps)
  and the objective is the weighted mean of d_l over layers (weights ``uniform``, ``early`` (1/(l+1)) or
  ``late`` ((l+1)), or an explicit list). 0 means the batch looks, layer by layer, like the training data.
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

EPS = 1e-5


class NoBatchNormError(ValueError):
    """The BN objective needs BatchNorm layers the victim does not have."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def layer_weights(n: int, scheme: str | Sequence[float]) -> torch.Tensor:
    if isinstance(scheme, str):
        idx = torch.arange(n, dtype=torch.float32)
        if scheme == "uniform":
            w = torch.ones(n)
        elif scheme == "early":
            w = 1.0 / (idx + 1)
        elif scheme == "late":
            w = idx + 1
        else:
            raise ValueError(f"unknown BN layer weighting {scheme!r}: use uniform, early, late or a list")
    else:
        w = torch.as_tensor(list(scheme), dtype=torch.float32)
        if len(w) != n:
            raise ValueError(f"{len(w)} BN layer weights given for a victim with {n} BatchNorm layers")
    return w / w.sum()


class BNStatistics:
    """Forward hooks that record, per BN layer, the batch mean and variance of the layer's input."""

    def __init__(self, model: nn.Module):
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise NoBatchNormError(
                f"the victim ({type(model).__name__}) has no BatchNorm layers with running statistics, so the BN "
                "alignment objective has nothing to align to; use the 'ce' (needs labels) or 'infomax' "
                "(label-free) objective instead, e.g. objective weights bn: 0, infomax: 1")
        self.means: list[torch.Tensor | None] = [None] * len(self.layers)
        self.vars: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            x = inputs[0]
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x.float(), dim=dims, unbiased=False)
            self.means[i], self.vars[i] = mean, var
        return hook

    def divergences(self) -> torch.Tensor:
        """d_l for each layer (see the module docstring), from the last forward pass."""
        out = []
        for layer, mu, var in zip(self.layers, self.means, self.vars):
            rm, rv = layer.running_mean.float(), layer.running_var.float()
            w2 = (mu - rm) ** 2 + (torch.sqrt(var + EPS) - torch.sqrt(rv + EPS)) ** 2
            out.append((w2 / (rv + EPS)).mean())
        return torch.stack(out)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BNStatistics":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


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
                 label_prior: torch.Tensor | None = None):
        weights.validate()
        self.victim = victim
        self.weights = weights
        self.stats = BNStatistics(victim) if weights.bn > 0 else None
        self.layer_w = layer_weights(len(self.stats.layers), bn_layer_weights) if self.stats else None
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


@torch.no_grad()
def dataset_bn_divergence(victim: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu",
                          batch_size: int = 256, layer_scheme: str | Sequence[float] = "uniform") -> tuple[float, list[float]]:
    """The BN divergence of a whole image set, from exact dataset-level moments accumulated over batches
    (not an average of noisy per-batch values). Returns (weighted total, per-layer values)."""
    device = torch.device(device)
    victim.eval()
    layers = batchnorm_layers(victim)
    if not layers:
        raise NoBatchNormError("the victim has no BatchNorm layers: the BN divergence is undefined for it")
    sums = [None] * len(layers)
    sq = [None] * len(layers)
    counts = [0] * len(layers)

    def hook(i):
        def fn(module, inputs, output):
            x = inputs[0].float()
            dims = [d for d in range(x.dim()) if d != 1]
            n = x.numel() // x.shape[1]
            s, s2 = x.sum(dim=dims).double(), (x * x).sum(dim=dims).double()
            sums[i] = s if sums[i] is None else sums[i] + s
            sq[i] = s2 if sq[i] is None else sq[i] + s2
            counts[i] += n
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
            victim(x)
    finally:
        for h in handles:
            h.remove()
    per_layer = []
    for layer, s, s2, n in zip(layers, sums, sq, counts):
        mu = (s / n).float()
        var = (s2 / n - (s / n) ** 2).clamp_min(0).float()
        rm, rv = layer.running_mean.float(), layer.running_var.float()
        w2 = (mu - rm) ** 2 + (torch.sqrt(var + EPS) - torch.sqrt(rv + EPS)) ** 2
        per_layer.append(float((w2 / (rv + EPS)).mean()))
    w = layer_weights(len(per_layer), layer_scheme)
    return float((torch.tensor(per_layer) * w).sum()), per_layer
