"""BatchNorm statistics as a summary of the victim's training data: one definition for the auxiliary-data
diagnostic (``bbgic aux-quality``), GIC's alignment objective, and the data-free inversion source.

For BN layer l and channel c, compare the Gaussian of the layer's input on a set of images, N(m, v), with the
running one, N(mu, s2) (eps added to both variances):
- ``kl`` (default): the symmetric Kullback-Leibler divergence
      J = 1/4 [ v/s2 + s2/v - 2 + (m - mu)^2 (1/v + 1/s2) ]  = (KL(p||q) + KL(q||p)) / 2
- ``w2``: the 2-Wasserstein distance scaled by the running variance
      W = [ (m - mu)^2 + (sqrt(v) - sqrt(s2))^2 ] / s2
A layer's divergence is the mean over its channels; a set's divergence is the (weighted) mean over layers.
:class:`BNMoments` accumulates exact dataset-level moments (float64 sums of x and x^2 over every sample and
position, unbiased variance, as PyTorch stores running_var); :class:`BNBatchStats` gives differentiable
per-batch moments for optimisation (shifted one-pass sums, :func:`channel_moments`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

_BN = nn.modules.batchnorm._BatchNorm


class NoBatchNormError(ValueError):
    """A BN-statistics measure asked of a network without BatchNorm running statistics."""


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BN]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None]


def symmetric_gaussian_kl(m: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, s2: torch.Tensor,
                          eps: float = 1e-5) -> torch.Tensor:
    """(KL(N(m,v) || N(mu,s2)) + KL(N(mu,s2) || N(m,v))) / 2, elementwise, with eps added to both variances."""
    v = v + eps
    s2 = s2 + eps
    return 0.25 * (v / s2 + s2 / v - 2.0 + (m - mu) ** 2 * (1.0 / v + 1.0 / s2))


def normalized_w2(m: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, s2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Squared 2-Wasserstein distance of N(m,v) and N(mu,s2) divided by s2, elementwise."""
    v = v + eps
    s2 = s2 + eps
    return ((m - mu) ** 2 + (torch.sqrt(v) - torch.sqrt(s2)) ** 2) / s2


DISTANCES: dict[str, Callable[..., torch.Tensor]] = {"kl": symmetric_gaussian_kl, "w2": normalized_w2}


def distance_fn(name: str) -> Callable[..., torch.Tensor]:
    try:
        return DISTANCES[name]
    except KeyError:
        raise ValueError(f"unknown BN distance {name!r}: use one of {', '.join(DISTANCES)}") from None


def layer_weights(n: int, scheme: str | Sequence[float] = "uniform") -> torch.Tensor:
    """Weights over n layers summing to 1: ``uniform``, ``early`` (1/(l+1)), ``late`` (l+1) or a list."""
    if isinstance(scheme, str):
        idx = torch.arange(n, dtype=torch.float64)
        if scheme == "uniform":
            w = torch.ones(n, dtype=torch.float64)
        elif scheme == "early":
            w = 1.0 / (idx + 1)
        elif scheme == "late":
            w = idx + 1
        else:
            raise ValueError(f"unknown BN layer weighting {scheme!r}: use uniform, early, late or a list")
    else:
        w = torch.as_tensor(list(scheme), dtype=torch.float64)
        if len(w) != n:
            raise ValueError(f"{len(w)} BN layer weights given for a network with {n} BatchNorm layers")
    return w / w.sum()


def _require_bn(model: nn.Module, layers) -> None:
    if not layers:
        raise NoBatchNormError(
            f"{type(model).__name__} has no BatchNorm layers with running statistics, so there are no training-data "
            "statistics to compare with; use the 'ce' (needs labels) or 'infomax' (label-free) objective instead")


class _BNHooks:
    """Owns hooks on a network's BN layers: ``remove()`` them, or use the object as a context manager."""

    handles: list

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class BNMoments(_BNHooks):
    """Forward pre-hooks accumulating, per BN layer, exact float64 sums of x and x^2 of the layer's input."""

    def __init__(self, model: nn.Module):
        self.layers = batchnorm_layers(model)
        _require_bn(model, self.layers)
        self.s1: dict[str, torch.Tensor] = {}
        self.s2: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._make_hook(name)) for name, m in self.layers]

    def _make_hook(self, name: str):
        def hook(module, inputs):
            x = inputs[0].detach()
            c = x.shape[1]
            flat = x.transpose(0, 1).reshape(c, -1).double()
            s1, s2 = flat.sum(1).cpu(), (flat * flat).sum(1).cpu()
            if name in self.s1:
                self.s1[name] += s1
                self.s2[name] += s2
                self.count[name] += flat.shape[1]
            else:
                self.s1[name], self.s2[name], self.count[name] = s1, s2, flat.shape[1]
        return hook

    def divergences(self, distance: str = "kl") -> list[tuple[str, float]]:
        """Per layer (mean over channels), in layer order."""
        fn = distance_fn(distance)
        out = []
        for name, m in self.layers:
            if name not in self.count:
                continue
            n = self.count[name]
            mean = self.s1[name] / n
            var = (self.s2[name] - n * mean * mean).clamp_min(0) / max(n - 1, 1)
            out.append((name, float(fn(mean, var, m.running_mean.detach().double().cpu(),
                                       m.running_var.detach().double().cpu(), m.eps).mean())))
        return out


def channel_moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-channel mean and unbiased variance of ``x`` (N, C, ...), in float32.

    Sums of the shifted values and their squares, reduced over the contiguous trailing dimensions first, cost about
    half of ``torch.var_mean`` over (0, 2, 3) forward and backward on CPU (a strided reduction there); shifting by
    the layer's running mean (close to the batch mean) keeps the one-pass variance free of cancellation.
    """
    c = x.shape[1]
    shift = shift.detach().float()
    xc = x.float() - shift.view(1, c, *([1] * (x.dim() - 2)))
    flat = xc.flatten(2) if x.dim() > 2 else xc.unsqueeze(2)
    n = flat.shape[0] * flat.shape[2]
    s1 = flat.sum(2).sum(0)
    s2 = flat.square().sum(2).sum(0)
    m = s1 / n
    return m + shift, (s2 - n * m * m).clamp_min(0) / max(n - 1, 1)


class BNBatchStats(_BNHooks):
    """Forward hooks recording differentiable per-batch moments of every BN layer's input: the one collector behind
    GIC's BN objective and the data-free inversion source."""

    def __init__(self, model: nn.Module, distance: str = "kl"):
        self.layers = [m for _, m in batchnorm_layers(model)]
        _require_bn(model, self.layers)
        self.fn = distance_fn(distance)
        self.means: list[torch.Tensor | None] = [None] * len(self.layers)
        self.vars: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            self.means[i], self.vars[i] = channel_moments(inputs[0], module.running_mean)
        return hook

    def divergences(self) -> torch.Tensor:
        """Per layer (mean over channels), from the last forward pass."""
        return torch.stack([self.fn(mu, var, layer.running_mean.float(), layer.running_var.float(), layer.eps).mean()
                            for layer, mu, var in zip(self.layers, self.means, self.vars)])



@torch.no_grad()
def dataset_bn_divergence(model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu",
                          batch_size: int = 256, distance: str = "kl",
                          layer_scheme: str | Sequence[float] = "uniform") -> tuple[float, list[float]]:
    """A whole image set's divergence from exact dataset-level moments (eval mode): (weighted total, per layer)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    with BNMoments(model) as moments:
        try:
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].to(device)
                model(x.float().div(255.0) if x.dtype == torch.uint8 else x.float())
        finally:
            model.train(was_training)
        per_layer = [v for _, v in moments.divergences(distance)]
    w = layer_weights(len(per_layer), layer_scheme)
    return float((torch.tensor(per_layer, dtype=torch.float64) * w).sum()), per_layer


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images, batch_size: int | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """Reset every BN layer's running statistics and re-estimate them on ``images`` (an ImageSet or a float
    tensor in [0,1]) with train-mode passes and a cumulative average; with ``batch_size=None`` the whole set is
    one batch, so the running mean and (unbiased) variance are exactly the data's. Weights are untouched."""
    device = torch.device(device)
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        if isinstance(images, torch.Tensor):
            step = batch_size or len(images)
            for s in range(0, len(images), step):
                model(images[s:s + step].to(device).float())
        else:
            for batch in images.batches(batch_size or len(images), device=device):
                model(batch.x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return model
