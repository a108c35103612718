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

import hashlib
import json
import logging
import time
from dataclasses import asdict
from typing import Any, Mapping

import torch

from ..bnstats import NoBatchNormError, dataset_bn_divergence
from ..config import asdict_public, build_config
from ..data.imageset import ImageSet
from ..keys import GicInfo, gic_summary_line, per_source_key
from ..utils.cache import cache_dir, hash_weights
from ..utils.io import atomic_torch_save, atomic_write_text
from .calibrators import Calibrator, build_calibrator
from .drift import drift_report
from .fit import GICConfig, apply_calibrator, fit_calibrator

log = logging.getLogger(__name__)

_MEMORY_CACHE: dict[str, dict[str, Any]] = {}


def fit_key(victim: torch.nn.Module, aux: ImageSet, cfg: GICConfig, seed: int) -> str:
    h = hashlib.sha1()
    hash_weights(h, victim)
    h.update(aux.images.contiguous().numpy().tobytes())
    h.update(aux.labels.numpy().tobytes())
    h.update(aux.sources.numpy().tobytes())
    h.update(json.dumps({**cfg.identity(), "seed": seed}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


class GIC:
    """Guided Input Calibration: a bounded input transformation g fitted through the frozen victim."""

    def __init__(self, config: GICConfig | Mapping[str, Any] | None = None, **overrides: Any):
        if config is None or isinstance(config, Mapping):
            data = {**dict(config or {}), **overrides}
            config = build_config(GICConfig, [(data, "GIC settings")])
        elif overrides:
            config = build_config(GICConfig, [(asdict_public(config), "config"), (overrides, "keyword arguments")])
        else:
            config.validate()
        self.config: GICConfig = config
        self.calibrators: dict[str | None, Calibrator] = {}  # None: the whole set; else one per source name
        self.info: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self._last: tuple[ImageSet, ImageSet] | None = None  # (set, g(set)) of the last transform

    @classmethod
    def from_sources(cls, dataset: str | None = None, yaml_path: str | None = None,
                     cli: Mapping[str, Any] | None = None) -> "GIC":
        """``defense_configs/gic/<dataset>.yaml`` < ``yaml_path`` < ``cli``; a key GIC does not take is an error.
        The yaml files configure the ``gic`` defense too: their defense-level keys (``placement``, the base, the
        run-level BackdoorBench keys) are skipped there, not on the command line."""
        from ..config import config_keys, config_layers
        from .defense import GICDefenseConfig

        defense_only = set(config_keys(GICDefenseConfig)) - set(config_keys(GICConfig))  # placement, base, run keys
        layers = [(values if source == "the command line" else
                   {k: v for k, v in values.items() if k not in defense_only}, source)
                  for values, source in config_layers("gic", dataset, yaml_path, cli)]
        return cls(build_config(GICConfig, layers))

    @property
    def fitted(self) -> bool:
        return bool(self.calibrators)

    # -- fitting ------------------------------------------------------------------------------------------------
    def _fit_one(self, victim: torch.nn.Module, aux: ImageSet, device: torch.device, seed: int,
                 progress: bool | None, amp: bool, key: str) -> tuple[Calibrator, dict[str, Any]]:
        cfg = self.config
        if cfg.gic_cache and key in _MEMORY_CACHE:
            entry = _MEMORY_CACHE[key]
            return entry["calibrator"], {**entry["info"], GicInfo.CACHED: 1.0}
        path = cache_dir() / f"{key}.pt"
        if cfg.gic_cache and path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                cal = build_calibrator(data["family"], tuple(data["shape"]), float(data["delta"]), data["norm"],
                                       int(data["hidden"]))
                cal.load_state_dict(data["state"])
                _MEMORY_CACHE[key] = {"calibrator": cal.to(device).eval(), "info": data["info"]}
                return _MEMORY_CACHE[key]["calibrator"], {**data["info"], GicInfo.CACHED: 1.0}
            except Exception as exc:  # a damaged cache entry is refitted, never trusted
                log.warning("ignoring unreadable GIC cache entry %s: %s", path, exc)
        fit = fit_calibrator(victim, aux, cfg, device=device, seed=seed, amp=amp,
                             progress=progress)
        info = {GicInfo.SECONDS: fit.seconds, GicInfo.STEPS: float(fit.steps), GicInfo.DELTA: fit.delta,
                GicInfo.FINAL_LOSS: fit.history[-1]["loss"] if fit.history else float("nan"), GicInfo.CACHED: 0.0}
        if cfg.gic_cache:
            _MEMORY_CACHE[key] = {"calibrator": fit.calibrator, "info": info}
            try:
                atomic_torch_save({"family": cfg.family, "shape": list(aux.shape), "delta": fit.delta, "norm": cfg.norm,
                                   "hidden": cfg.generator_hidden,
                                   "state": {k: v.detach().cpu() for k, v in fit.calibrator.state_dict().items()},
                                   "info": info}, path)
            except OSError as exc:
                log.debug("could not write GIC cache %s: %s", path, exc)
        return fit.calibrator, info

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
        key = "summary-" + hashlib.sha1(key.encode()).hexdigest()[:20]
        path = cache_dir() / f"{key}.json"
        if self.config.gic_cache:
            if key in _MEMORY_CACHE:
                return dict(_MEMORY_CACHE[key])
            try:
                summary = json.loads(path.read_text())
                _MEMORY_CACHE[key] = summary
                return dict(summary)
            except (OSError, ValueError):
                pass
        summary = self.measure(victim, aux, device)
        if self.config.gic_cache:
            _MEMORY_CACHE[key] = summary
            try:
                atomic_write_text(path, json.dumps(summary))
            except OSError as exc:
                log.debug("could not write GIC cache %s: %s", path, exc)
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
        return {"config": asdict(self.config), "info": dict(self.info), "summary": dict(self.summary),
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
