"""Data-free, class-conditional images synthesised from the victim itself (``synthetic:inversion``).

DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020), re-implemented from the paper: the victim's
BatchNorm running statistics summarise its training data, so random inputs are optimised until, at every BN
layer, the batch mean and variance of the layer's input match the running mean and variance, while the victim
assigns each input its wanted class. The loss per batch is

    CE(f(x), y) + bn_weight * R_BN(x) + tv_weight * TV_2(x) + l2_weight * mean(x^2)

with TV_2 the mean squared difference of neighbouring pixels. R_BN is, by default (``bn_distance="kl"``), the
symmetric Gaussian KL between the batch statistics and the running statistics, averaged over channels and
layers (the D_BN of :mod:`.quality`); DeepInversion's own ``sum_l ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2``
is ``bn_distance="l2"``. We default to the scale-free distance because the l2 norms grow with a layer's width
and activation scale, so no single weight suits every network (on a small CNN, weight 1 with the l2 form kept
the cross-entropy from falling: the victim recognised 16 % of its own synthesised images; with the KL form
100 %). Pixels are optimised directly (Adam, betas (0.5, 0.99), cosine learning-rate decay) and clipped to
[0,1] after each step; each step sees the batch randomly shifted by up to ``jitter`` pixels (a cyclic roll),
which keeps the images from over-fitting single pixels. Each batch mixes all classes evenly, because the
running statistics describe all classes together.

Budget: each image costs ``steps`` forward/backward passes of its batch. Measured on this project's 2-core CPU
machine while other jobs kept it busy (load average 5), one torch thread: 300 images of 28x28 for a width-16
``smallcnn`` took 98 s with the defaults (200 steps, batches of 128) and 15 s with 50 steps; ``steps``
(option ``inversion_steps``) trades quality for time linearly. On a busy 2-core machine
``torch.set_num_threads(1)`` was several times faster than two spin-waiting threads.

Everything is driven by one seed: the initial pixels and the jitter come from a generator seeded per batch, so a
seed fixes the output (on a given device and thread count). Images are float32 (not 8-bit).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..bnstats import BNBatchStats, NoBatchNormError

log = logging.getLogger(__name__)


@dataclass
class InversionConfig:
    steps: int = 200
    lr: float = 0.1
    batch_size: int = 128
    bn_weight: float = 1.0
    tv_weight: float = 1e-2
    l2_weight: float = 1e-4
    jitter: int = 2
    bn_distance: str = "kl"  # "kl": mean symmetric Gaussian KL over channels and layers; "l2": DeepInversion's norms
    init_std: float = 0.2  # initial pixels: 0.5 + init_std * N(0, 1), clipped

    def validate(self) -> None:
        if int(self.steps) < 1:
            raise ValueError(f"inversion steps must be >= 1, got {self.steps}")
        if not float(self.lr) > 0:
            raise ValueError(f"inversion lr must be > 0, got {self.lr}")
        if int(self.batch_size) < 1:
            raise ValueError(f"inversion batch_size must be >= 1, got {self.batch_size}")
        for k in ("bn_weight", "tv_weight", "l2_weight", "init_std"):
            if float(getattr(self, k)) < 0:
                raise ValueError(f"inversion {k} must be >= 0, got {getattr(self, k)}")
        if self.bn_distance not in ("kl", "l2"):
            raise ValueError(f"inversion bn_distance must be 'kl' or 'l2', got {self.bn_distance!r}")
        if int(self.jitter) < 0:
            raise ValueError(f"inversion jitter must be >= 0, got {self.jitter}")


def _bn_term(stats, distance: str) -> torch.Tensor:
    """R_BN of the last forward pass from the BN-statistics hooks (:class:`~backdoorbench_gic.bnstats.BNBatchStats`):
    ``kl``, the mean over layers of the channel-mean symmetric KL; ``l2``, DeepInversion's
    ``sum_l ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2``. Zero without BatchNorm layers (``stats`` None)."""
    if stats is None:
        return torch.zeros(())
    if distance == "l2":  # DeepInversion's: scale-dependent, so its weight must suit the network
        return sum(torch.linalg.vector_norm(m - layer.running_mean) + torch.linalg.vector_norm(v - layer.running_var)
                   for layer, m, v in zip(stats.layers, stats.means, stats.vars))
    return stats.divergences().mean()


def _tv2(x: torch.Tensor) -> torch.Tensor:
    dx = x[:, :, :, 1:] - x[:, :, :, :-1]
    dy = x[:, :, 1:, :] - x[:, :, :-1, :]
    return (dx ** 2).mean() + (dy ** 2).mean()


def balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
    """0, 1, ..., K-1, 0, 1, ...: every batch mixes the classes evenly."""
    return np.tile(np.arange(num_classes, dtype=np.int64), int(per_class))


def invert_victim(model: torch.nn.Module, num_classes: int, per_class: int, chw: tuple[int, int, int], *, seed: int = 0,
                  config: InversionConfig | None = None, device: torch.device | str = "cpu",
                  progress: bool | None = None) -> tuple[torch.Tensor, np.ndarray, dict]:
    """Synthesise ``per_class`` images of each class: (float32 N x C x H x W in [0,1], labels, stats)."""
    from ..utils.progress import progress_bar

    from ..utils.logs import progress_enabled

    cfg = config or InversionConfig()
    cfg.validate()
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        hooks = BNBatchStats(model, "kl")
    except NoBatchNormError:
        hooks = None
        log.warning("the victim has no BatchNorm layer: inversion falls back to cross-entropy plus image priors, "
                    "which gives images far from the training distribution")
    labels = balanced_labels(num_classes, per_class)
    n = len(labels)
    out = torch.empty((n, *chw), dtype=torch.float32)
    n_batches = math.ceil(n / cfg.batch_size)
    bar = progress_bar(total=n_batches * cfg.steps, desc="inversion", leave=False,
                       disable=not progress_enabled(progress))
    last = {}
    try:
        for b in range(n_batches):
            sl = slice(b * cfg.batch_size, min(n, (b + 1) * cfg.batch_size))
            y = torch.as_tensor(labels[sl], device=device)
            g = torch.Generator().manual_seed((int(seed) * 1_000_003 + b) % (2**63))
            x0 = (0.5 + cfg.init_std * torch.randn((len(y), *chw), generator=g)).clamp_(0, 1)
            x = x0.to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.99))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
            shifts = torch.randint(-cfg.jitter, cfg.jitter + 1, (cfg.steps, 2), generator=g).tolist() \
                if cfg.jitter else [[0, 0]] * cfg.steps
            for step in range(cfg.steps):
                dy, dx = shifts[step]
                inp = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else x
                logits = model(inp)
                ce = F.cross_entropy(logits, y)
                bn = _bn_term(hooks, cfg.bn_distance).to(ce.device)
                loss = ce + cfg.bn_weight * bn + cfg.tv_weight * _tv2(x) + cfg.l2_weight * (x ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
                bar.update(1)
            with torch.no_grad():
                final = model(x)
                bn_final = float(_bn_term(hooks, cfg.bn_distance))
                acc = float((final.argmax(1) == y).float().mean())
            last = {"ce": float(ce.detach()), "bn": bn_final, "acc": acc}
            log.debug("inversion batch %d/%d: ce %.3f bn %.3f acc %.3f", b + 1, n_batches, last["ce"], last["bn"], acc)
            out[sl] = x.detach().cpu()
    finally:
        bar.close()
        if hooks is not None:
            hooks.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    return out.clamp_(0.0, 1.0), labels, last


def inversion_cache_key(model: torch.nn.Module, num_classes: int, per_class: int, chw: tuple[int, int, int],
                        seed: int, config: InversionConfig) -> str:
    """Content key of one inversion: the victim's weights, what is asked for, and every setting."""
    from dataclasses import asdict

    from ..utils.cache import content_key

    return content_key(weights=model, settings={"num_classes": num_classes, "per_class": per_class, "chw": list(chw),
                                                "seed": int(seed), "bn_moments": "bnstats.BNBatchStats",
                                                **asdict(config)})


def cached_invert_victim(model: torch.nn.Module, num_classes: int, per_class: int, chw: tuple[int, int, int], *,
                         seed: int = 0, config: InversionConfig | None = None, device: torch.device | str = "cpu",
                         cache_dir=None) -> tuple[torch.Tensor, np.ndarray, dict]:
    """:func:`invert_victim` behind a content cache: a matrix asks for the same inversion once per defense and
    with/without GIC; synthesising it again each time would cost minutes per cell on a CPU.

    The cache holds plain tensors only (loaded with ``weights_only=True``); ``cache_dir=None`` disables it."""
    from pathlib import Path

    from ..utils.cache import load_or_compute
    from ..utils.io import atomic_torch_save

    cfg = config or InversionConfig()
    if cache_dir is None:
        return invert_victim(model, num_classes, per_class, chw, seed=seed, config=cfg, device=device)

    def load(path: Path) -> tuple[torch.Tensor, np.ndarray, dict]:
        data = torch.load(path, map_location="cpu", weights_only=True)
        log.info("synthetic:inversion: reusing %s", path)
        return data["images"], data["labels"].numpy(), {k: float(v) for k, v in data["stats"].items()}

    def save(entry: tuple[torch.Tensor, np.ndarray, dict], path: Path) -> None:
        images, labels, stats = entry
        atomic_torch_save({"images": images, "labels": torch.as_tensor(labels),
                           "stats": {k: torch.tensor(float(v)) for k, v in stats.items()}}, path)

    path = Path(cache_dir) / f"{inversion_cache_key(model, num_classes, per_class, chw, seed, cfg)}.pt"
    return load_or_compute(path, lambda: invert_victim(model, num_classes, per_class, chw, seed=seed, config=cfg,
                                                       device=device), load=load, save=save, what="inversion")[0]


def inversion_cache_dir():
    """``$BBGIC_CACHE_DIR/inversion`` (default ``~/.cache/backdoorbench_gic/gic/inversion``), beside GIC's fits."""
    from ..utils.cache import cache_dir

    return cache_dir() / "inversion"
