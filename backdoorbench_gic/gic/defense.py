"""The ``gic`` defense: fit g once through the frozen victim, calibrate the auxiliary set, hand it unchanged
to any registered base defense (``--defense gic --base sau``, or the alias ``gic-sau``).

Configuration keys are routed by name: GIC's own keys (:class:`~backdoorbench_gic.gic.fit.GICConfig`, plus
``base``) configure the calibration; every other key goes to the base defense, whose own config class
validates it (an unknown key is still an error naming it); the common BackdoorBench keys (device, seed,
ratio, reserved_type, ...) go to both. The base defense's packaged ``defense_configs/<base>/<dataset>.yaml``
applies first, so ``gic`` with ``base: ft`` runs exactly the fine-tuning that ``ft`` runs, on calibrated data.

A fitted g is cached by content (victim weights, auxiliary images and labels, GIC settings, seed), in
memory and under ``$BBGIC_CACHE_DIR`` (default ``~/.cache/backdoorbench_gic/gic``), so the matrix fits it once
per victim and auxiliary set and reuses it across base defenses. Test data is never calibrated.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..config import ConfigError, RunConfig, build_config, config_keys, default_yaml_for, read_yaml
from ..data.imageset import ImageSet
from ..data.transforms import TrainAugment
from ..defenses.base import Defense, DefenseConfig, Monitor, PurifyResult
from ..registry import DEFENSES
from ..utils.cache import cache_dir, hash_weights
from ..utils.io import atomic_torch_save
from .calibrators import Calibrator, build_calibrator
from .drift import drift_report
from .fit import GICConfig, apply_calibrator, fit_calibrator
from ..bnstats import NoBatchNormError, dataset_bn_divergence

log = logging.getLogger(__name__)

_MEMORY_CACHE: dict[str, dict[str, Any]] = {}


@dataclass
class GICDefenseConfig(DefenseConfig, GICConfig):
    base: str = "ft"

    def validate(self) -> None:
        DefenseConfig.validate(self)
        GICConfig.validate(self)


GIC_KEYS = set(config_keys(GICConfig)) | {"base"}
COMMON_KEYS = set(config_keys(RunConfig))


def split_keys(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keys for GIC, keys for the base defense); common keys go to both."""
    gic, base = {}, {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in GIC_KEYS:
            gic[key] = v
        elif key in COMMON_KEYS:
            gic[key] = v
            base[key] = v
        else:
            base[key] = v
    return gic, base


def fit_key(victim: torch.nn.Module, aux: ImageSet, cfg: GICConfig, seed: int) -> str:
    h = hashlib.sha1()
    hash_weights(h, victim)
    h.update(aux.images.contiguous().numpy().tobytes())
    h.update(aux.labels.numpy().tobytes())
    h.update(aux.sources.numpy().tobytes())
    h.update(json.dumps({**cfg.key(), "seed": seed}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


class GICDefense(Defense):
    """Guided Input Calibration in front of any base defense."""

    config_class = GICDefenseConfig
    augment = False  # the base defense decides; GIC itself never augments
    default_base: str | None = None

    def __init__(self, config: GICDefenseConfig | None = None, base_defense: Defense | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        if base_defense is None:
            base_defense = DEFENSES.get(self.config.base)(**{k: getattr(self.config, k) for k in config_keys(RunConfig)})
        self.base = base_defense

    @classmethod
    def from_sources(cls, dataset: str | None = None, yaml_path: str | None = None, cli: dict[str, Any] | None = None,
                     name: str | None = None) -> "GICDefense":
        """Layers as for every defense (gic yaml < --yaml_path < CLI), each split between GIC and the base."""
        layers: list[tuple[Mapping[str, Any], str]] = []
        packaged = default_yaml_for("gic", dataset)
        if packaged is not None:
            layers.append((read_yaml(packaged), str(packaged)))
        if yaml_path:
            layers.append((read_yaml(yaml_path), str(yaml_path)))
        if cli:
            layers.append(({k: v for k, v in cli.items() if v is not None}, "the command line"))
        if dataset is not None:
            layers.append(({"dataset": dataset}, "the --dataset argument"))
        gic_layers, base_layers = [], []
        if cls.default_base:
            gic_layers.append(({"base": cls.default_base}, f"the alias gic-{cls.default_base}"))
        for data, source in layers:
            g, b = split_keys(data)
            gic_layers.append((g, source))
            base_layers.append((b, source))
        config = build_config(cls.config_class, gic_layers)
        try:
            base_cls = DEFENSES.get(config.base)
        except KeyError as exc:
            raise ConfigError(f"key 'base': {exc}") from None
        if issubclass(base_cls, GICDefense):
            raise ConfigError("key 'base': GIC cannot wrap itself; name a purification defense such as ft or sau")
        base_name = DEFENSES.resolve(config.base)
        base_packaged = default_yaml_for(base_name, dataset)
        base_all = ([(read_yaml(base_packaged), str(base_packaged))] if base_packaged else []) + base_layers
        base = base_cls(build_config(base_cls.config_class, base_all))
        return cls(config, base)

    @property
    def name(self) -> str:
        return f"gic-{self.base.name}"

    @property
    def prefix(self) -> str:
        return f"gic-{self.base.prefix}"

    # -- calibration ----------------------------------------------------------------------------------------
    def _fit(self, victim: torch.nn.Module, aux: ImageSet, device: torch.device, seed: int,
             progress: bool | None) -> tuple[Calibrator, dict[str, Any]]:
        cfg = self.config
        key = fit_key(victim, aux, cfg, seed)
        if cfg.gic_cache and key in _MEMORY_CACHE:
            entry = _MEMORY_CACHE[key]
            return entry["calibrator"], {**entry["info"], "gic_cached": 1.0}
        path = cache_dir() / f"{key}.pt"
        if cfg.gic_cache and path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                cal = build_calibrator(data["family"], tuple(data["shape"]), float(data["delta"]), data["norm"],
                                       int(data["hidden"]))
                cal.load_state_dict(data["state"])
                info = {**data["info"], "gic_cached": 1.0}
                _MEMORY_CACHE[key] = {"calibrator": cal.to(device).eval(), "info": data["info"]}
                return _MEMORY_CACHE[key]["calibrator"], info
            except Exception as exc:  # a damaged cache entry is refitted, never trusted
                log.warning("ignoring unreadable GIC cache entry %s: %s", path, exc)
        fit = fit_calibrator(victim, aux, cfg, device=device, seed=seed, amp=cfg.amp, progress=progress)
        info = {"gic_seconds": fit.seconds, "gic_steps": float(fit.steps), "gic_delta": fit.delta,
                "gic_final_loss": fit.history[-1]["loss"] if fit.history else float("nan"), "gic_cached": 0.0}
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

    def calibrate(self, victim: torch.nn.Module, aux: ImageSet, *, device: torch.device,
                  progress: bool | None = None) -> tuple[ImageSet, dict[str, Any]]:
        """g(aux): one g for the whole set, or (``per_source``) one per provenance source of a mix."""
        cfg = self.config
        seed = cfg.gic_seed if cfg.gic_seed is not None else cfg.random_seed
        t0 = time.perf_counter()
        groups = [(None, aux)]
        if cfg.per_source and len(aux.source_names) > 1:
            groups = [(s, aux.subset(aux.positions_of_source(s))) for s in aux.source_names
                      if len(aux.positions_of_source(s))]
        images = aux.float_images()
        info: dict[str, Any] = {}
        for source, part in groups:
            cal, part_info = self._fit(victim, part, device, seed, progress)
            out = apply_calibrator(cal, part, device).images
            if source is None:
                images = out
            else:
                images[aux.positions_of_source(source)] = out
            info.update(part_info if source is None else {f"{k}[{source}]": v for k, v in part_info.items()})
            info.setdefault("calibrator", cal)
        calibrated = aux.with_images(images, name=f"{aux.name}+gic")
        info["gic_total_seconds"] = time.perf_counter() - t0
        try:
            # D_BN exactly as bbgic aux-quality reports it (symmetric KL, uniform over layers), whatever the
            # objective: the label-free alignment signal that compares calibrators
            info["bn_div_before"] = dataset_bn_divergence(victim, aux.images, device)[0]
            info["bn_div_after"] = dataset_bn_divergence(victim, calibrated.images, device)[0]
        except NoBatchNormError:
            pass
        num_classes = int(victim.head.out_features)
        drift = drift_report(victim, aux, calibrated, num_classes, device, cfg.drift_warn_ratio)
        info.update(drift.as_row())
        return calibrated, info

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device,
               train_augment: TrainAugment | None = None, monitor: Monitor | None = None,
               progress: bool | None = None) -> PurifyResult:
        calibrated, info = self.calibrate(model, aux, device=device, progress=progress)
        t0 = time.perf_counter()
        result = self.base.purify(model, calibrated, device=device, train_augment=train_augment, monitor=monitor,
                                  progress=progress)
        info["base_seconds"] = time.perf_counter() - t0
        result.extras.update(info)
        return result

    def __repr__(self) -> str:
        gic = {k: getattr(self.config, k) for k in ("family", "norm", "delta", "obj_bn", "obj_ce", "obj_infomax",
                                                     "obj_drift", "gic_steps", "gic_lr")}
        return f"GICDefense({', '.join(f'{k}={v!r}' for k, v in gic.items())}, base={self.base!r})"


DEFENSES.add("gic", GICDefense)


def register_aliases() -> list[str]:
    """``gic-<base>`` for every registered base defense (called once the built-in defenses are registered)."""
    added = []
    for base in DEFENSES.names():
        if base.startswith("gic") or f"gic-{base}" in DEFENSES.names():
            continue
        alias_cls = type(f"GIC_{base.replace('-', '_')}", (GICDefense,), {"default_base": base,
                                                                           "__doc__": f"GIC in front of {base}."})
        DEFENSES.add(f"gic-{base}", alias_cls)
        added.append(f"gic-{base}")
    return added


register_aliases()
