"""Fitting a calibrator g against the frozen victim, and applying it.

Adam with cosine decay over ``steps``, mini-batches drawn by a seeded generator, optional early stopping when the
objective's moving average stops improving (off by default: on plateaus it quit fits that had more to gain). Only
g's parameters receive gradients: the victim is put in eval mode with ``requires_grad`` switched off for the
duration (so no weight gradients are computed, which is what keeps a step near one victim forward+backward) and
restored afterwards; its weights never change.
bf16 autocast and channels_last on CUDA; the same code on the CPU.

``delta: auto`` picks the budget from the auxiliary data alone: short fits over a grid of budgets, scored by
the dataset-level BN divergence after calibration (the D_BN of ``bbgic aux-quality``); the smallest budget that achieves at least (1 - tol) of
the best divergence reduction wins. No labels of the test set and no test data are involved.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch
from ..utils.progress import progress_bar

from ..config import ConfigError, SelfChecking, check_range, identity, not_identity, require
from ..data.imageset import ImageSet
from ..utils.logs import progress_enabled
from ..utils.runtime import autocast, make_generator
from .calibrators import FAMILIES, NORMS, Calibrator, build_calibrator
from ..bnstats import dataset_bn_divergence
from .objectives import GICObjective

log = logging.getLogger(__name__)


@dataclass
class GICConfig(SelfChecking):
    """GIC's own keys (prefixed where a base defense uses the same word). Every field enters the cache key of a
    fit (:meth:`identity`) unless it is marked :func:`~backdoorbench_gic.config.not_identity`, so a new field cannot
    be forgotten. Checked when made (:class:`~backdoorbench_gic.config.SelfChecking`)."""

    family: str = "prompt"  # prompt | generator | prompt+generator
    norm: str = "linf"  # linf | l2
    delta: float | str = 16 / 255  # a number in pixel units, or "auto"
    # {name: weight} or {name: {weight: w, option: value}} over the registered objectives (gic/objectives.py)
    objectives: dict = field(default_factory=lambda: {"bn": 1.0})
    gic_lr: float = 0.05
    gic_steps: int = 100
    # 100 steps of 32: the step count, not the batch, buys alignment (benchmarks/gic_budget.py: 98 % of 100 x 128's
    # BN-divergence reduction for a third of its image passes; purification unchanged, BENCHMARKS.md)
    gic_batch_size: int = 32
    gic_patience: int = 0  # steps without a 0.1 % improvement of the loss's moving average; 0 disables
    generator_hidden: int = 16
    per_source: bool = False  # mix: sets: one g per source instead of one for all
    auto_delta_grid: list[float] = field(default_factory=lambda: [4 / 255, 8 / 255, 16 / 255, 32 / 255])
    auto_delta_steps: int = 40
    auto_delta_tol: float = 0.1
    # warn when a class's predicted share exceeds this multiple of its label share
    drift_warn_ratio: float = not_identity(2.0)
    gic_seed: int | None = not_identity(None)  # default: the run's random_seed (the resolved seed enters the key)
    gic_cache: bool = not_identity(True)

    def validate(self) -> None:
        from .objectives import parse_objectives

        require(self.family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        require(self.norm in NORMS, "norm", f"must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if isinstance(self.delta, str):
            require(self.delta == "auto", "delta", f"must be a number > 0 or 'auto', got {self.delta!r}")
        else:
            require(self.delta > 0, "delta", f"must be > 0, got {self.delta}")
            if self.norm == "linf":
                require(self.delta <= 1, "delta", f"an L-infinity budget above 1 is meaningless for [0,1] pixels, got {self.delta}")
        parse_objectives(self.objectives)
        check_range(self, "gic_lr", 0, lo_open=True)
        check_range(self, "gic_steps", 0)
        check_range(self, "gic_batch_size", 1)
        check_range(self, "gic_patience", 0)
        check_range(self, "auto_delta_steps", 1)
        check_range(self, "auto_delta_tol", 0, 1)
        require(all(d > 0 for d in self.auto_delta_grid) and len(self.auto_delta_grid) > 0, "auto_delta_grid",
                "must be a non-empty list of budgets > 0")

    def identity(self) -> dict[str, Any]:
        """The settings that determine a fitted g (for caching): every GICConfig field not marked otherwise."""
        return identity(self, GICConfig)

    def gic_settings(self) -> dict[str, Any]:
        """GIC's own keys and values (a subclass's further fields, such as the gic defense's, left out)."""
        return {f.name: getattr(self, f.name) for f in fields(GICConfig)}

    @property
    def bn_layer_scheme(self) -> Any:
        """The bn objective's layer weighting (what ``delta: auto`` scores budgets with)."""
        bn = self.objectives.get("bn")
        return bn.get("layer_weights", "uniform") if isinstance(bn, dict) else "uniform"


@dataclass
class FitResult:
    calibrator: Calibrator
    history: list[dict[str, float]]
    steps: int
    seconds: float
    delta: float
    delta_search: list[dict[str, float]] = field(default_factory=list)


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and no parameter gradients for the duration; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def _num_classes(victim: torch.nn.Module) -> int:
    head = getattr(victim, "head", None)
    if head is not None:
        return int(head.out_features)
    raise ValueError("cannot tell the victim's number of classes (expected a VictimModel with a linear head)")


def fit_calibrator(victim: torch.nn.Module, aux: ImageSet, cfg: GICConfig, *, device: torch.device, seed: int = 0,
                   amp: bool = True, progress: bool | None = None, delta: float | None = None,
                   steps: int | None = None) -> FitResult:
    """Fit one g on ``aux`` (float or uint8 images in [0,1]); ``delta``/``steps`` override the config's."""
    t0 = time.perf_counter()
    delta_search: list[dict[str, float]] = []
    if delta is None:
        if cfg.delta == "auto":
            delta, delta_search = choose_delta(victim, aux, cfg, device=device, seed=seed, amp=amp)
        else:
            delta = float(cfg.delta)
    steps = cfg.gic_steps if steps is None else steps
    torch.manual_seed(seed)
    calibrator = build_calibrator(cfg.family, aux.shape, delta, cfg.norm, cfg.generator_hidden).to(device)
    if device.type == "cuda":
        calibrator = calibrator.to(memory_format=torch.channels_last)
    gen = make_generator(seed)
    history: list[dict[str, float]] = []
    if steps == 0:
        return FitResult(calibrator.eval(), history, 0, time.perf_counter() - t0, delta, delta_search)
    num_classes = _num_classes(victim)
    with frozen(victim):
        objective = GICObjective(victim, aux, cfg.objectives, device, num_classes)
        opt = torch.optim.Adam(calibrator.parameters(), lr=cfg.gic_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        ema, best, since_best = None, math.inf, 0
        bar = progress_bar(total=steps, desc=f"GIC fit ({cfg.family}, delta {delta * 255:.1f}/255)", leave=False,
                   disable=not progress_enabled(progress))
        step = 0
        try:
            while step < steps:
                for batch in aux.batches(cfg.gic_batch_size, shuffle=True, generator=gen, device=device):
                    x = batch.x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else batch.x
                    with autocast(device, amp):
                        loss, parts = objective(calibrator(x), batch.y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    value = float(loss.detach())
                    history.append({"step": step, "loss": value, **parts})
                    ema = value if ema is None else 0.9 * ema + 0.1 * value
                    if ema < best * (1 - 1e-3):
                        best, since_best = ema, 0
                    else:
                        since_best += 1
                    bar.update()
                    if step >= steps or (cfg.gic_patience and since_best >= cfg.gic_patience):
                        break
                if cfg.gic_patience and since_best >= cfg.gic_patience:
                    log.info("GIC fit stopped early at step %d (no improvement for %d steps)", step, cfg.gic_patience)
                    break
        finally:
            bar.close()
            objective.close()
    return FitResult(calibrator.eval(), history, step, time.perf_counter() - t0, delta, delta_search)


@torch.no_grad()
def apply_calibrator(calibrator: Calibrator, aux: ImageSet, device: torch.device, batch_size: int = 512) -> ImageSet:
    """g(aux) as a float ImageSet (same labels, indices and provenance)."""
    calibrator.eval()
    out = []
    for batch in aux.batches(batch_size, device=device):
        out.append(calibrator(batch.x).float().cpu())
    return aux.with_images(torch.cat(out).clamp_(0, 1), name=f"{aux.name}+gic")


def choose_delta(victim: torch.nn.Module, aux: ImageSet, cfg: GICConfig, *, device: torch.device, seed: int = 0,
                 amp: bool = True, grid: Sequence[float] | None = None) -> tuple[float, list[dict[str, float]]]:
    """The smallest budget whose short fit reaches (1 - tol) of the best BN-divergence reduction on ``aux``."""
    if "bn" not in cfg.objectives:
        raise ConfigError("key 'delta': 'auto' scores budgets by the BN divergence, so it needs the bn objective")
    grid = sorted(grid or cfg.auto_delta_grid)
    base, _ = dataset_bn_divergence(victim, aux.images, device, layer_scheme=cfg.bn_layer_scheme)
    rows = []
    for d in grid:
        fit = fit_calibrator(victim, aux, cfg, device=device, seed=seed, amp=amp, progress=False, delta=d,
                             steps=cfg.auto_delta_steps)
        cal = apply_calibrator(fit.calibrator, aux, device)
        score, _ = dataset_bn_divergence(victim, cal.images, device, layer_scheme=cfg.bn_layer_scheme)
        rows.append({"delta": d, "bn_divergence": score, "reduction": base - score})
    best = max(r["reduction"] for r in rows)
    if best <= 0:
        chosen = grid[0]
    else:
        chosen = next(r["delta"] for r in rows if r["reduction"] >= (1 - cfg.auto_delta_tol) * best)
    log.info("auto delta: %s -> %.4f (%.1f/255); BN divergence before %.4f", rows, chosen, chosen * 255, base)
    return chosen, [{"bn_divergence_before": base, **r} for r in rows]
