"""GIC as one calibration object, in the shape of ART's preprocessors: ``fit(victim, aux)``, ``__call__(x)``,
``transform(aux)``, ``state_dict()`` / ``load_state_dict()``.

```python
gic = GIC({"delta": 16 / 255, "objectives": {"bn": 1.0}})
gic.fit(victim, aux, device=device, seed=0)      # g fitted through the frozen victim (cached by content)
calibrated = gic.transform(aux)                  # g(aux) as an ImageSet; gic(x) for a batch tensor
print(gic.summary)                               # D_BN before/after, drift flag, fit time
```

A fit is keyed by content: the victim's weights, the auxiliary images, labels and provenance, every identity
field of :class:`~backdoorbench_gic.gic.fit.GICConfig` (derived from the dataclass, so a new field cannot be left
out) and the seed. Fits are kept in memory and under ``$BBGIC_CACHE_DIR`` (default
``~/.cache/backdoorbench_gic/gic``), so a matrix fits g once per victim and auxiliary set and reuses it across base
defenses. With ``per_source`` a mixed set gets one calibrator per provenance source. Test data is never calibrated.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from ..bnstats import NoBatchNormError, dataset_bn_divergence
from ..config import build_config, config_layers
from ..data.imageset import ImageSet
from ..keys import GicInfo, gic_summary_line, per_source_key
from ..utils.cache import cache_dir, content_key, load_or_compute
from ..utils.io import atomic_torch_save, atomic_write_text
from .calibrators import Calibrator, build_calibrator
from .drift import drift_report
from .fit import GICConfig, apply_calibrator, fit_calibrator

log = logging.getLogger(__name__)

_MEMORY_CACHE: dict[str, Any] = {}  # cache path -> fitted (calibrator, info) or summary


def fit_key(victim: torch.nn.Module, aux: ImageSet, cfg: GICConfig, seed: int) -> str:
    return content_key(weights=victim, data=[aux], settings={**cfg.identity(), "seed": seed})


class GIC:
    """Guided Input Calibration: a bounded input transformation g fitted through the frozen victim."""

    def __init__(self, config: GICConfig | Mapping[str, Any] | None = None, **overrides: Any):
        if config is None or isinstance(config, Mapping):
            data = {**dict(config or {}), **overrides}
            config = build_config(GICConfig, [(data, "GIC settings")])
        elif overrides:
            config = build_config(GICConfig, [(config.gic_settings(), "config"), (overrides, "keyword arguments")])
        elif not isinstance(config, GICConfig):
            raise TypeError(f"GIC needs a GICConfig or a mapping of its keys, got {type(config).__name__}")
        self.config: GICConfig = config  # checked when it was made (a GICConfig checks itself)
        self.calibrators: dict[str | None, Calibrator] = {}  # None: the whole set; else one per source name
        self.info: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self._last: tuple[ImageSet, ImageSet] | None = None  # (set, g(set)) of the last transform

    @classmethod
    def from_sources(cls, dataset: str | None = None, yaml_path: str | None = None,
                     cli: Mapping[str, Any] | None = None, *, skip: Collection[str] = ()) -> "GIC":
        """``defense_configs/gic/<dataset>.yaml`` < ``yaml_path`` < ``cli``; a key GIC does not take is an error.
        ``skip``: keys the yaml files may carry for someone else, skipped there (not on the command line). The
        packaged files hold GIC's keys only; a caller that reads a yaml of the ``gic`` defense passes that defense's
        own keys (:data:`backdoorbench_gic.gic.defense.DEFENSE_KEYS`: placement, base, the run-level keys)."""
        skip = frozenset(skip)
        layers = [(values if source == "the command line" else {k: v for k, v in values.items() if k not in skip},
                   source) for values, source in config_layers("gic", dataset, yaml_path, cli)]
        return cls(build_config(GICConfig, layers))

    @property
    def fitted(self) -> bool:
        return bool(self.calibrators)

    # -- fitting ------------------------------------------------------------------------------------------------
    def _fit_one(self, victim: torch.nn.Module, aux: ImageSet, device: torch.device, seed: int,
                 progress: bool | None, amp: bool, key: str) -> tuple[Calibrator, dict[str, Any]]:
        cfg = self.config

        def fit() -> tuple[Calibrator, dict[str, Any]]:
            result = fit_calibrator(victim, aux, cfg, device=device, seed=seed, amp=amp, progress=progress)
            return result.calibrator, {GicInfo.SECONDS: result.seconds, GicInfo.STEPS: float(result.steps),
                                       GicInfo.DELTA: result.delta, GicInfo.CACHED: 0.0,
                                       GicInfo.FINAL_LOSS: result.history[-1]["loss"] if result.history else math.nan}

        def load(path: Path) -> tuple[Calibrator, dict[str, Any]]:
            data = torch.load(path, map_location="cpu", weights_only=True)
            cal = build_calibrator(data["family"], tuple(data["shape"]), float(data["delta"]), data["norm"],
                                   int(data["hidden"]))
            cal.load_state_dict(data["state"])
            return cal.to(device).eval(), data["info"]

        def save(entry: tuple[Calibrator, dict[str, Any]], path: Path) -> None:
            cal, info = entry
            atomic_torch_save({"family": cfg.family, "shape": list(aux.shape), "delta": cal.delta, "norm": cfg.norm,
                               "hidden": cfg.generator_hidden,
                               "state": {k: v.detach().cpu() for k, v in cal.state_dict().items()}, "info": info}, path)

        (cal, info), hit = load_or_compute(cache_dir() / f"{key}.pt", fit, load=load, save=save, what="GIC fit",
                                           enabled=cfg.gic_cache, memory=_MEMORY_CACHE)
        return cal, ({**info, GicInfo.CACHED: 1.0} if hit else info)

    def fit(self, victim: torch.nn.Module, aux: ImageSet, *, device: torch.device | str = "cpu", seed: int = 0,
            progress: bool | None = None, report: bool = True, amp: bool = True) -> "GIC":
        """Fit g on ``aux`` through the frozen ``victim`` (its weights never change); with ``report`` also measure
        the summary (D_BN before and after, the drift monitor) on the calibrated set. ``amp``: bf16 autocast on
        CUDA (ignored on the CPU)."""
        device = torch.device(device)
        t0 = time.perf_counter()
        groups: list[tuple[str | None, ImageSet]] = [(None, aux)]
        if self.config.per_source and len(aux.source_names) > 1:
            groups = [(s, aux.subset(aux.positions_of_source(s))) for s in aux.source_names
                      if len(aux.positions_of_source(s))]
        self.calibrators, self.info, self._last = {}, {}, None
        keys = []
        for source, part in groups:
            keys.append(fit_key(victim, part, self.config, seed))
            cal, part_info = self._fit_one(victim, part, device, seed, progress, amp, keys[-1])
            self.calibrators[source] = cal
            self.info.update(part_info if source is None else {per_source_key(k, source): v for k, v in part_info.items()})
        self.summary = self._cached_summary(victim, aux, device, "+".join(keys)) if report else {}
        self.info[GicInfo.TOTAL_SECONDS] = time.perf_counter() - t0
        return self

    def _cached_summary(self, victim: torch.nn.Module, aux: ImageSet, device: torch.device, key: str) -> dict[str, Any]:
        """:meth:`measure`, kept beside the fits: a function of the victim, the set and the fitted g alone."""
        path = cache_dir() / f"summary-{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"
        summary, _ = load_or_compute(path, lambda: self.measure(victim, aux, device),
                                     load=lambda p: json.loads(p.read_text()),
                                     save=lambda s, p: atomic_write_text(p, json.dumps(s)), what="GIC summary",
                                     enabled=self.config.gic_cache, memory=_MEMORY_CACHE)
        return dict(summary)

    # -- applying -----------------------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not self.calibrators:
            raise RuntimeError("GIC is not fitted: call fit(victim, aux) or load_state_dict() first")

    def transform(self, aux: ImageSet, device: torch.device | str = "cpu") -> ImageSet:
        """g(aux) as a float ImageSet with the same labels, indices and provenance."""
        self._require_fitted()
        device = torch.device(device)
        if self._last is not None and self._last[0] is aux:  # the set fitted and measured last: computed once
            return self._last[1]
        out = self._transform(aux, device)
        self._last = (aux, out)
        return out

    def _transform(self, aux: ImageSet, device: torch.device) -> ImageSet:
        if None in self.calibrators:
            return apply_calibrator(self.calibrators[None], aux, device)
        images = aux.float_images()
        for source, cal in self.calibrators.items():
            pos = aux.positions_of_source(source)
            if len(pos):
                images[pos] = apply_calibrator(cal, aux.subset(pos), device).images
        return aux.with_images(images, name=f"{aux.name}+gic")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, source: str | None = None) -> torch.Tensor:
        """g(x) for a batch of images in [0,1] (N x C x H x W); ``source`` picks a per-source calibrator."""
        self._require_fitted()
        cal = self.calibrators.get(source) or self.calibrators.get(None)
        if cal is None:
            raise KeyError(f"no calibrator for source {source!r}; fitted sources: {sorted(map(str, self.calibrators))}")
        cal.eval()
        p = next(cal.parameters())
        return cal(x.to(p.device, torch.float32)).clamp(0, 1).to(x.device)

    # -- the summary ----------------------------------------------------------------------------------------------
    def measure(self, victim: torch.nn.Module, aux: ImageSet, device: torch.device) -> dict[str, Any]:
        """D_BN before/after (as ``bbgic aux-quality`` reports it: symmetric KL, layers alike), for a mixed set also
        per source (``bn_div_before[<source>]``), and the drift monitor."""
        calibrated = self.transform(aux, device)
        out: dict[str, Any] = {}
        try:
            out[GicInfo.BN_DIV_BEFORE] = dataset_bn_divergence(victim, aux.images, device)[0]
            out[GicInfo.BN_DIV_AFTER] = dataset_bn_divergence(victim, calibrated.images, device)[0]
            if len(aux.source_names) > 1:  # a mix: each source's own divergence, before and after
                for source in aux.source_names:
                    pos = aux.positions_of_source(source)
                    if len(pos):
                        out[per_source_key(GicInfo.BN_DIV_BEFORE, source)] = dataset_bn_divergence(
                            victim, aux.images[pos], device)[0]
                        out[per_source_key(GicInfo.BN_DIV_AFTER, source)] = dataset_bn_divergence(
                            victim, calibrated.images[pos], device)[0]
        except NoBatchNormError:
            pass
        drift = drift_report(victim, aux, calibrated, int(victim.head.out_features), device,
                             self.config.drift_warn_ratio)
        out.update(drift.as_row())
        return out

    def describe(self) -> str:
        """One line for people: delta, D_BN before -> after, drift."""
        return gic_summary_line({GicInfo.DELTA: self.config.delta, **self.info, **self.summary}) or "GIC: not fitted"

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._require_fitted()
        return {"config": copy.deepcopy(self.config.gic_settings()), "info": dict(self.info),
                "summary": dict(self.summary),
                "calibrators": {("" if s is None else s): {
                    "family": self.config.family, "shape": list(_shape_of(c)), "delta": c.delta, "norm": c.norm,
                    "hidden": self.config.generator_hidden,
                    "state": {k: v.detach().cpu() for k, v in c.state_dict().items()}}
                    for s, c in self.calibrators.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> "GIC":
        self.config = build_config(GICConfig, [(state["config"], "a saved GIC state")])
        self.info, self.summary = dict(state.get("info", {})), dict(state.get("summary", {}))
        self.calibrators, self._last = {}, None
        for s, d in state["calibrators"].items():
            cal = build_calibrator(d["family"], tuple(d["shape"]), float(d["delta"]), d["norm"], int(d["hidden"]))
            cal.load_state_dict(d["state"])
            self.calibrators[s or None] = cal.eval()
        return self

    def __repr__(self) -> str:
        c = self.config
        return (f"GIC(family={c.family!r}, norm={c.norm!r}, delta={c.delta!r}, objectives={c.objectives!r}, "
                f"steps={c.gic_steps}, fitted={self.fitted})")


def _shape_of(cal: Calibrator) -> tuple[int, ...]:
    if hasattr(cal, "v"):
        return tuple(cal.v.shape)
    if hasattr(cal, "prompt"):
        return tuple(cal.prompt.v.shape)
    first = cal.net[0]
    return (first.in_channels, 0, 0)
