"""The Defense base class: a typed config and one ``purify`` method.

A defense receives the victim (a :class:`~backdoorbench_gic.models.VictimModel`, pixels in [0,1]) and an
auxiliary :class:`~backdoorbench_gic.data.ImageSet`, and returns the purified model plus one history row per
epoch. Loading records, building the auxiliary set, writing files and evaluating are the pipeline's business
(:mod:`backdoorbench_gic.pipeline`), not the defense's: the optional ``monitor`` callback lets the pipeline
log test metrics per epoch, as BackdoorBench's CSVs do, without the defense ever seeing test data or using
those numbers.

A subclass sets ``config_class`` (a dataclass extending :class:`DefenseConfig`, with BackdoorBench's key
names, checked in ``validate``), optionally ``csv_prefix`` (BackdoorBench's CSV file prefix) and
``augment`` (whether BackdoorBench applies the train transform to its clean subset), and implements
:meth:`purify`. Register it with ``@DEFENSES.register("name")``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..config import RunConfig, asdict_public, build_config, load_config
from ..data.imageset import ImageSet
from ..data.transforms import TrainAugment

Monitor = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class DefenseConfig(RunConfig):
    """The BackdoorBench keys every purification defense accepts (see :class:`RunConfig`)."""


@dataclass
class PurifyResult:
    model: torch.nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # defense-specific artefacts (masks, thresholds, ...)


class Defense:
    config_class: ClassVar[type[DefenseConfig]] = DefenseConfig
    csv_prefix: ClassVar[str | None] = None  # defaults to the registry name
    augment: ClassVar[bool] = True  # BackdoorBench: ft, ft-sam, i-bau augment; sau, fst, npd do not
    registry_name: ClassVar[str] = "defense"

    def __init__(self, config: DefenseConfig | None = None, **overrides: Any):
        if config is None:
            config = build_config(self.config_class, [(overrides, "keyword arguments")])
        elif overrides:
            config = build_config(self.config_class, [(asdict_public(config), "config"), (overrides, "keyword arguments")])
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        else:
            config.validate()
        self.config = config

    @classmethod
    def from_sources(cls, dataset: str | None = None, yaml_path: str | None = None,
                     cli: dict[str, Any] | None = None, name: str | None = None) -> "Defense":
        """Defaults < ``defense_configs/<name>/<dataset>.yaml`` < ``yaml_path`` < ``cli``."""
        return cls(load_config(cls.config_class, name or cls.registry_name, dataset, yaml_path, cli))

    @property
    def name(self) -> str:
        return self.registry_name

    @property
    def prefix(self) -> str:
        return self.csv_prefix or self.registry_name

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device,
               train_augment: TrainAugment | None = None, monitor: Monitor | None = None,
               progress: bool | None = None) -> PurifyResult:
        """Return a purified copy of ``model`` (the input is not modified) and per-epoch history rows.

        ``train_augment`` is the dataset's train transform; use it only when ``self.augment`` is True.
        ``monitor(model)`` (optional) returns test metrics to add to each history row; never act on them.
        """
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------------------
    @staticmethod
    def copy_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        from ..utils.runtime import prepare_model

        return prepare_model(copy.deepcopy(model), device)

    def augment_fn(self, train_augment: TrainAugment | None) -> TrainAugment | None:
        return train_augment if self.augment else None

    def __repr__(self) -> str:
        keys = ("epochs", "batch_size", "lr", "client_optimizer", "lr_scheduler")
        extra = {k: v for k, v in asdict_public(self.config).items() if k not in RunConfig.__dataclass_fields__}
        shown = {k: getattr(self.config, k) for k in keys} | extra
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
