"""The ``gic`` defense: Guided Input Calibration (:class:`~backdoorbench_gic.gic.calibration.GIC`) placed around any
registered base defense (``--defense gic --base sau``, the alias ``gic-sau``, or ``base: {name: sau, ...}``).

Configuration is nested: GIC's own keys (:class:`~backdoorbench_gic.gic.fit.GICConfig`, ``placement``,
``bn_batch_size``) at the top, the base defense under ``base`` (a name, or ``{name: sau, <sau's keys>}``). The base's
config is built once, by its own class, starting from its packaged ``defense_configs/<base>/<dataset>.yaml``, and
is held in :class:`GICDefenseConfig` (``base_config``); so ``gic`` with base ``ft`` runs exactly the fine-tuning
``ft`` runs, on exactly the auxiliary draw ``ft`` gets: the run-level keys (ratio, reserved_type, random_seed,
batch_size, device, ...) of a gic run are its base's (:attr:`GICDefense.run_config`), never copied. Flat keys (from
a command line or a matrix spec) are placed by name: GIC's keys to GIC, keys of the base's config to the base, the
run-level keys to the base; a key both could take (say ``norm``) is refused as ambiguous, a key neither takes is
refused. :meth:`GICDefense.resolve_config` is the one path from keys to a config; both ``GICDefense(**keys)`` and
``from_sources`` take it.

Placement (``placement``):
- ``before`` (the paper's): purify on g(aux);
- ``bn-after``: purify on aux as given, then re-estimate the purified model's BatchNorm running statistics on g(aux)
  (g fitted through the victim; no labels needed, no test data);
- ``both``: purify on g(aux), then re-estimate on g(aux);
- baselines without calibration: ``bn-reset`` (put the victim's own running statistics back after purification)
  and ``bn-refresh`` (re-estimate them on the raw auxiliary set);
- ``bn-transfer``: calibrate the statistics instead of the inputs, guided by the victim. Per BatchNorm channel, the
  victim shows how the auxiliary set's statistics differ from its training statistics (its running ones); the
  purified model's statistics on the auxiliary set are moved by that same difference, in standardised units:
  mean_p + (mu_v - mean_v) / sd_v * sd_p and var_p * sigma2_v / var_v, where mean/var are a layer's input moments on
  the auxiliary set (train-mode passes) and mu_v, sigma2_v the victim's running statistics. Scale-equivariant, so it
  survives fine-tuning rescaling the weights (which is what breaks ``bn-reset``); no labels, no g.
  ``bn_transfer_layers: n`` moves only the first n BatchNorm layers (in module order), where an input shift shows
  first; the deeper layers keep the statistics the purification left them (0, the default: every layer).
Test data is never calibrated.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from ..bnstats import batchnorm_layers, recalibrate_bn
from ..config import (ConfigError, RunConfig, asdict_public, build_config, check_range, config_keys, config_layers,
                      require)
from ..data.imageset import ImageSet
from ..data.transforms import TrainAugment
from ..defenses import purify_cache
from ..defenses.base import Defense, DefenseConfig, Monitor, PurifyResult
from ..keys import GicInfo
from ..registry import DEFENSES
from .calibration import GIC
from .fit import GICConfig

log = logging.getLogger(__name__)

PLACEMENTS = ("before", "bn-after", "both", "bn-reset", "bn-refresh", "bn-transfer")
CALIBRATED = ("before", "bn-after", "both")  # placements that fit g


@dataclass
class GICDefenseConfig(GICConfig):
    """The gic defense: GIC's own keys (:class:`GICConfig`), where calibration acts, and the base defense, nested:
    ``base`` names it, ``base_config`` is its resolved config (built once by the base's class; the run-level keys
    of the run are its). Made by :meth:`GICDefense.resolve_config`; checked when made."""

    base: str = "ft"  # the base defense's registry name (a yaml may write {name: <defense>, <its keys>})
    placement: str = "before"
    bn_batch_size: int = 256  # batch of the BatchNorm re-estimation passes (bn-after, both, bn-refresh, bn-transfer)
    bn_transfer_layers: int = 0  # bn-transfer: move only the first n BatchNorm layers (0: all)
    base_config: DefenseConfig | None = field(default=None, metadata={"nested": True})

    def validate(self) -> None:
        super().validate()
        require(self.placement in PLACEMENTS, "placement",
                f"must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        check_range(self, "bn_batch_size", 1)
        check_range(self, "bn_transfer_layers", 0)
        require(self.bn_transfer_layers == 0 or self.placement == "bn-transfer", "bn_transfer_layers",
                f"only placement bn-transfer uses it (placement is {self.placement!r}); leave it at 0")
        base_cls = DEFENSES.get(self.base)
        require(isinstance(self.base_config, base_cls.config_class), "base_config",
                f"must be the resolved {base_cls.config_class.__name__} of base {self.base!r} (build the config "
                f"with GICDefense.resolve_config), got {type(self.base_config).__name__}")

    def flat(self) -> dict[str, Any]:
        """One flat mapping, as a command line writes it: the base's run-level keys, GIC's and the placement's
        keys, the base by name (its own keys are in ``base_config``)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("nested")}
        return {**{k: getattr(self.base_config, k) for k in config_keys(RunConfig)}, **own}

    def as_layer(self) -> dict[str, Any]:
        """The whole config as one yaml-style layer (``base: {name: ..., <every key of the base>}``), from which
        :meth:`GICDefense.resolve_config` makes it again."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("nested")}
        return {**own, "base": {"name": self.base, **asdict_public(self.base_config)}}


GIC_KEYS = frozenset(f.name for f in fields(GICDefenseConfig) if not f.metadata.get("nested"))  # GIC's, placement's
COMMON_KEYS = frozenset(config_keys(RunConfig))
# the keys of the gic defense's yaml files that are not GIC's own (what GIC.from_sources skips in them)
DEFENSE_KEYS = (GIC_KEYS - frozenset(config_keys(GICConfig))) | COMMON_KEYS


def _base_name(base: Any) -> str:
    return str(base["name"]) if isinstance(base, Mapping) else str(base)


def split_keys(data: Mapping[str, Any], base_keys: set[str], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(GIC's keys, the base's keys) of one flat layer; ``base.<key>`` goes to the base explicitly."""
    gic, base = {}, {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key.startswith("base."):
            base[key[5:]] = v
        elif key == "base" and isinstance(v, Mapping):
            gic["base"] = _base_name(v)
            base.update({kk: vv for kk, vv in v.items() if kk != "name"})
        elif key in GIC_KEYS and key in base_keys:
            raise ConfigError(f"key {key!r} (from {source}) is ambiguous: both GIC and the base defense take it; "
                              f"write base: {{{key}: ...}} in a yaml (or --base.{key}) for the base, or set it in "
                              "defense_configs/gic/ for GIC")
        elif key in GIC_KEYS:
            gic[key] = v
        elif key in COMMON_KEYS or key in base_keys:
            base[key] = v
        else:
            raise ConfigError(f"unknown key {key!r} (from {source}): neither GIC nor the base defense takes it "
                              f"(GIC's keys: {', '.join(sorted(GIC_KEYS))})")
    return gic, base


class GICDefense(Defense):
    """Guided Input Calibration around any base defense."""

    config_class = GICDefenseConfig
    augment = False  # the base defense decides; GIC itself never augments
    cacheable = False  # the pipeline's purification cache serves the base, not the wrapper
    default_base: str | None = None

    def __init__(self, config: GICDefenseConfig | None = None, **keys: Any):
        """From a resolved config, or from keys (``GICDefense(base="sau", delta=8 / 255, ratio=0.1)``: GIC's and the
        placement's keys to GIC, the rest to the base, which starts from its own class defaults), or both (the keys
        override the config's)."""
        if config is None or keys:
            layers = [] if config is None else [(config.as_layer(), "config")]
            config = self.resolve_config(layers + [(keys, "keyword arguments")])
        elif not isinstance(config, GICDefenseConfig):
            raise TypeError(f"{type(self).__name__} needs a GICDefenseConfig, got {type(config).__name__}")
        self.config = config
        self.base = DEFENSES.get(config.base)(config.base_config)
        self.gic = GIC(config)

    @classmethod
    def resolve_config(cls, layers: list[tuple[Mapping[str, Any], str]], dataset: str | None = None,
                       packaged: bool = False) -> GICDefenseConfig:
        """The one path from flat key layers (lowest first) to a config: each layer split between GIC and the base
        (:func:`split_keys`); the base's config built once by its own class from its packaged
        ``defense_configs/<base>/<dataset>.yaml`` (when ``packaged``) < its keys from the layers < ``dataset``."""
        base_choice: Any = cls.default_base or "ft"
        for data, _ in layers:
            if data.get("base") is not None:
                base_choice = data["base"]
        base_name = _base_name(base_choice)
        try:
            base_cls = DEFENSES.get(base_name)
        except KeyError as exc:
            raise ConfigError(f"key 'base': {exc}") from None
        if issubclass(base_cls, GICDefense):
            raise ConfigError("key 'base': GIC cannot wrap itself; name a purification defense such as ft or sau")
        base_name = DEFENSES.resolve(base_name)
        base_keys = set(config_keys(base_cls.config_class))
        gic_layers: list[tuple[Mapping[str, Any], str]] = []
        base_layers = config_layers(base_name, dataset) if packaged else []
        for data, source in layers:
            g, b = split_keys(data, base_keys, source)
            gic_layers.append((g, source))
            base_layers.append((b, source))
        if dataset is not None:
            base_layers.append(({"dataset": dataset}, "the --dataset argument"))
        base_config = build_config(base_cls.config_class, base_layers)
        gic_layers.append(({"base": base_name, "base_config": base_config}, f"the base defense {base_name}"))
        return build_config(cls.config_class, gic_layers)

    @classmethod
    def from_sources(cls, dataset: str | None = None, yaml_path: str | None = None, cli: dict[str, Any] | None = None,
                     name: str | None = None) -> "GICDefense":
        """GIC: gic yaml < --yaml_path < CLI; the base: its packaged yaml < its keys from those layers. The run-level
        keys of the run are the base's resolved ones, so both draw the same auxiliary set."""
        return cls(cls.resolve_config(config_layers("gic", dataset, yaml_path, cli), dataset, packaged=True))

    @property
    def run_config(self) -> RunConfig:
        """The base's config: a gic run draws, seeds and runs exactly as its base would."""
        return self.base.run_config

    def settings(self) -> dict[str, Any]:
        return self.config.flat()

    @property
    def name(self) -> str:
        return f"gic-{self.base.name}"

    @property
    def prefix(self) -> str:
        return f"gic-{self.base.prefix}"

    def calibrate(self, victim: torch.nn.Module, aux: ImageSet, *, device: torch.device,
                  progress: bool | None = None) -> tuple[ImageSet, dict[str, Any]]:
        """Fit g through the victim and return g(aux) with the fit's info and summary."""
        cfg, run = self.config, self.run_config
        seed = cfg.gic_seed if cfg.gic_seed is not None else run.random_seed
        self.gic.fit(victim, aux, device=device, seed=seed, progress=progress, amp=run.amp)
        log.info("%s", self.gic.describe())
        return self.gic.transform(aux, device), {**self.gic.info, **self.gic.summary}

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device,
               train_augment: TrainAugment | None = None, monitor: Monitor | None = None,
               progress: bool | None = None) -> PurifyResult:
        cfg = self.config
        info: dict[str, Any] = {}
        calibrated = None
        if cfg.placement in CALIBRATED:
            calibrated, info = self.calibrate(model, aux, device=device, progress=progress)
        data = calibrated if cfg.placement in ("before", "both") else aux
        t0 = time.perf_counter()
        result = purify_cache.purify(self.base, model, data, device=device, train_augment=train_augment,
                                     monitor=monitor, progress=progress)
        info[GicInfo.BASE_SECONDS] = time.perf_counter() - t0
        t1 = time.perf_counter()
        if cfg.placement in ("bn-after", "both"):
            recalibrate_bn(result.model, calibrated, batch_size=cfg.bn_batch_size, device=device)
        elif cfg.placement == "bn-refresh":
            recalibrate_bn(result.model, aux, batch_size=cfg.bn_batch_size, device=device)
        elif cfg.placement == "bn-reset":
            restore_bn_statistics(result.model, model)
        elif cfg.placement == "bn-transfer":
            transfer_bn_statistics(result.model, model, aux, batch_size=cfg.bn_batch_size, device=device,
                                   layers=cfg.bn_transfer_layers or None)
        result.model.eval()
        info[GicInfo.PLACEMENT_SECONDS] = time.perf_counter() - t1
        result.extras.update(info)
        return result

    def __repr__(self) -> str:
        shown = {k: getattr(self.config, k) for k in ("placement", "family", "norm", "delta", "objectives",
                                                       "gic_steps", "gic_lr")}
        return f"GICDefense({', '.join(f'{k}={v!r}' for k, v in shown.items())}, base={self.base!r})"


@torch.no_grad()
def restore_bn_statistics(model: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """Copy every BatchNorm layer's running statistics of ``source`` (same architecture) into ``model``."""
    mine, theirs = batchnorm_layers(model), batchnorm_layers(source)
    if [n for n, _ in mine] != [n for n, _ in theirs]:
        raise ValueError("restore_bn_statistics: the two models' BatchNorm layers differ")
    for (_, m), (_, s) in zip(mine, theirs):
        m.running_mean.copy_(s.running_mean)
        m.running_var.copy_(s.running_var)
        if m.num_batches_tracked is not None and s.num_batches_tracked is not None:
            m.num_batches_tracked.copy_(s.num_batches_tracked)
    return model


def _bn_stats(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    return [(m.running_mean.clone(), m.running_var.clone(), m.eps) for _, m in batchnorm_layers(model)]


@torch.no_grad()
def transfer_bn_statistics(model: torch.nn.Module, victim: torch.nn.Module, aux: ImageSet, *,
                           batch_size: int | None = 256, device: torch.device | str = "cpu",
                           layers: int | None = None) -> torch.nn.Module:
    """``bn-transfer``: set ``model``'s running statistics to its statistics on ``aux`` moved, channel by channel and
    in standardised units, by the difference between the victim's training statistics and the victim's statistics
    on ``aux``. With ``layers=n`` only the first n BatchNorm layers (module order) are moved; the others keep the
    running statistics ``model`` came with. ``victim`` is not modified (a copy is re-estimated)."""
    theirs = _bn_stats(victim)
    own = _bn_stats(model)
    if len(own) != len(theirs):
        raise ValueError("transfer_bn_statistics: the two models' BatchNorm layers differ")
    probe = recalibrate_bn(copy.deepcopy(victim).to(device), aux, batch_size=batch_size, device=device)
    on_aux_v = _bn_stats(probe)
    recalibrate_bn(model, aux, batch_size=batch_size, device=device)
    n = len(own) if layers is None else layers
    for i, ((_, m), (mu_v, var_v, eps), (mean_v, v_v, _)) in enumerate(zip(batchnorm_layers(model), theirs, on_aux_v)):
        if i >= n:  # not moved: the statistics the model came with
            m.running_mean.copy_(own[i][0])
            m.running_var.copy_(own[i][1])
            continue
        z = (mu_v - mean_v) / (v_v + eps).sqrt()
        m.running_mean.add_(z * (m.running_var + m.eps).sqrt())
        m.running_var.mul_((var_v + eps) / (v_v + eps))
    return model


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
