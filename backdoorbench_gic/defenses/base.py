"""The Defense base class: a typed config and one ``purify`` method.

A defense receives the victim (a :class:`~backdoorbench_gic.models.VictimModel`, pixels in [0,1]) and an
auxiliary :class:`~backdoorbench_gic.data.ImageSet`, and returns the purified model plus one history row per
epoch. Loading records, building the auxiliary set, writing files and evaluating are the pipeline's business
(:mod:`backdoorbench_gic.pipeline`), not the defense's: the optional ``monitor`` callback lets the pipeline
log test metrics per epoch, as BackdoorBench's CSVs do, without the defense ever seeing test data or using
those numbers.

The base class is a template in the shape of torchattacks' ``Attack``: :meth:`Defense.purify` owns the
plumbing every defense shares (seeding, the model copy, optimizer and scheduler, the epoch loop with its
progress bar, history rows, logging, model modes) and calls the subclass's hooks, in this order:

    setup(run)                     once: the defense's own objects (a reference model, masks, a new head, ...)
    build_optimizer(run)           once: over ``parameters(run)`` (default: every parameter of ``run.net``)
    for each epoch (``epochs_key``; SAU and i-BAU count ``n_rounds``):
        start_epoch(run, epoch)    optional (i-BAU's universal perturbation, FT-SAM's radius)
        step(run, net, batch)      for every batch: update and return (loss, logits) -- the algorithm
        end_epoch(run, epoch, stats) -> str   optional; its text is appended to the epoch's log line
    finish(run) -> dict            the result's extras

``run`` (:class:`Run`) carries the copied network, the auxiliary set, the device, the seeded generator, the
augmentation, the optimizer and scheduler; a subclass keeps its own per-run objects as attributes of it, so a
defense object holds no state between two ``purify`` calls. A defense whose work is not an epoch loop (one
that prunes and then fine-tunes, say) overrides :meth:`purify` and can still call :meth:`train` for its loop.

A subclass sets ``config_class`` (a dataclass extending :class:`DefenseConfig`, with BackdoorBench's key
names, checked in ``validate``), optionally ``csv_prefix`` (BackdoorBench's CSV file prefix) and
``augment`` (whether BackdoorBench applies the train transform to its clean subset). Register it with
``@DEFENSES.register("name")``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F
from ..utils.progress import progress_bar

from ..config import RunConfig, asdict_public, build_config, load_config, require
from ..data.imageset import Batch, ImageSet
from ..data.transforms import TrainAugment
from ..training import EpochStats, make_optimizer, make_scheduler, step_scheduler, supervised_step, train_epoch
from ..utils.logs import progress_enabled
from ..utils.runtime import make_generator

log = logging.getLogger(__name__)

Monitor = Callable[[torch.nn.Module], dict[str, float]]


def history_row(epoch: int, loss: float, acc: float, model: torch.nn.Module, monitor=None) -> dict[str, Any]:
    """One BackdoorBench-style row; the monitor's numbers are logged, never used."""
    row: dict[str, Any] = {"epoch": epoch, "train_epoch_loss_avg_over_batch": float(loss), "train_acc": float(acc)}
    if monitor is not None:
        was_training = model.training
        row.update(monitor(model))
        model.train(was_training)
    return row


@dataclass
class DefenseConfig(RunConfig):
    """The BackdoorBench keys every purification defense accepts (see :class:`RunConfig`)."""


def refuse_unused(cfg: Any, key: str, instead: str, why: str) -> None:
    """A key the defense does not use is an error naming the key it does use (its field defaults to None)."""
    require(getattr(cfg, key) is None, key, f"not used by this defense ({why}); set {instead!r} instead")


@dataclass
class PurifyResult:
    model: torch.nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # defense-specific artefacts (masks, thresholds, ...)


@dataclass(eq=False)
class Run:
    """One ``purify`` call's working state, handed to every hook; hooks add their own attributes."""

    net: torch.nn.Module  # the copy being purified, on ``device``
    aux: ImageSet
    device: torch.device
    generator: torch.Generator  # the one seeded source of data order, augmentation and random draws
    augment: TrainAugment | None
    progress: bool | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None


class Defense:
    config_class: ClassVar[type[DefenseConfig]] = DefenseConfig
    csv_prefix: ClassVar[str | None] = None  # defaults to the registry name
    augment: ClassVar[bool] = True  # BackdoorBench: ft, ft-sam, i-bau augment; sau, fst, npd do not
    cacheable: ClassVar[bool] = True  # the purified-model cache (purify_cache.py) may serve this defense's result
    registry_name: ClassVar[str] = "defense"

    def __init__(self, config: DefenseConfig | None = None, **overrides: Any):
        if config is None:
            config = build_config(self.config_class, [(overrides, "keyword arguments")])
        elif overrides:
            config = build_config(self.config_class, [(asdict_public(config), "config"), (overrides, "keyword arguments")])
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config  # checked when it was made (a RunConfig checks itself)

    @classmethod
    def from_sources(cls, dataset: str | None = None, yaml_path: str | None = None,
                     cli: dict[str, Any] | None = None, name: str | None = None) -> "Defense":
        """Defaults < ``defense_configs/<name>/<dataset>.yaml`` < ``yaml_path`` < ``cli``."""
        return cls(load_config(cls.config_class, name or cls.registry_name, dataset, yaml_path, cli))

    @property
    def run_config(self) -> RunConfig:
        """The run-level keys this defense runs with (auxiliary draw, seed, device): its own config; a wrapper's
        are its base's."""
        return self.config

    def settings(self) -> dict[str, Any]:
        """The resolved settings as one flat mapping (what a yaml would say)."""
        return dataclasses.asdict(self.config)

    @property
    def name(self) -> str:
        return self.registry_name

    @property
    def prefix(self) -> str:
        return self.csv_prefix or self.registry_name

    epochs_key: ClassVar[str] = "epochs"  # the config key counting passes over the auxiliary set
    unit: ClassVar[str] = "epoch"  # what one pass is called in logs and progress bars

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device,
               train_augment: TrainAugment | None = None, monitor: Monitor | None = None,
               progress: bool | None = None) -> PurifyResult:
        """Return a purified copy of ``model`` (the input is not modified) and per-epoch history rows.

        ``train_augment`` is the dataset's train transform; use it only when ``self.augment`` is True.
        ``monitor(model)`` (optional) returns test metrics to add to each history row; never act on them.
        """
        run = self.start(model, aux, device=device, train_augment=train_augment, progress=progress)
        self.setup(run)
        history = self.train(run, int(getattr(self.config, self.epochs_key)), monitor)
        run.net.eval()
        return PurifyResult(run.net, history, self.finish(run))

    def start(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device,
              train_augment: TrainAugment | None = None, progress: bool | None = None) -> Run:
        """The run's seeded generator and a copy of ``model`` on ``device``."""
        return Run(net=self.copy_model(model, device), aux=aux, device=device,
                   generator=make_generator(self.config.random_seed), augment=self.augment_fn(train_augment),
                   progress=progress)

    def train(self, run: Run, epochs: int, monitor: Monitor | None = None, *, name: str | None = None,
              data: ImageSet | None = None) -> list[dict[str, Any]]:
        """Build the optimizer and scheduler, then ``epochs`` passes of :meth:`step` over ``data`` (default
        ``run.aux``); one history row per pass."""
        cfg, name = self.config, name or self.name
        data = run.aux if data is None else data
        run.optimizer = self.build_optimizer(run)
        run.scheduler = make_scheduler(run.optimizer, cfg, epochs)
        step = functools.partial(self.step, run)
        history = []
        for epoch in progress_bar(range(epochs), desc=name, disable=not progress_enabled(run.progress)):
            self.start_epoch(run, epoch)
            stats = train_epoch(run.net, data, step, device=run.device, batch_size=cfg.batch_size,
                                generator=run.generator, augment=run.augment, train_mode=self.train_mode,
                                progress=run.progress, desc=f"{name} {self.unit} {epoch}")
            note = self.end_epoch(run, epoch, stats)
            step_scheduler(run.scheduler, stats.loss)
            history.append(history_row(epoch, stats.loss, stats.acc, run.net, monitor))
            log.info("%s %s %d/%d: loss %.4f, train acc %.4f%s", name, self.unit, epoch + 1, epochs, stats.loss,
                     stats.acc, f", {note}" if note else "")
        return history

    # -- the hooks a subclass writes ----------------------------------------------------------------------
    def setup(self, run: Run) -> None:
        """Once, before the optimizer is built."""

    def parameters(self, run: Run) -> Iterable[torch.nn.Parameter]:
        """What the optimizer updates."""
        return run.net.parameters()

    def build_optimizer(self, run: Run) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(run), self.config)

    @property
    def train_mode(self) -> bool:
        """The network's mode during the epoch loop (False keeps BatchNorm's statistics frozen)."""
        return True

    def start_epoch(self, run: Run, epoch: int) -> None:
        """Before each epoch's first batch."""

    def step(self, run: Run, net: torch.nn.Module, batch: Batch) -> tuple[Any, torch.Tensor]:
        """Update ``net`` on one batch; return (loss, detached logits). Default: :meth:`loss`, one optimizer step."""
        return supervised_step(run.optimizer, device=run.device, amp=self.config.amp,
                               loss_fn=functools.partial(self.loss, run))(net, batch)

    def loss(self, run: Run, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The default step's objective (cross-entropy)."""
        return F.cross_entropy(logits, y)

    def end_epoch(self, run: Run, epoch: int, stats: EpochStats) -> str | None:
        """After each epoch's last batch, before the scheduler steps; returns extra text for the log line."""
        return None

    def finish(self, run: Run) -> dict[str, Any]:
        """The result's extras, after training (the network is already in eval mode)."""
        return {}

    # -- helpers for subclasses -------------------------------------------------------------------------
    @staticmethod
    def copy_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        from ..utils.runtime import prepare_model

        return prepare_model(copy.deepcopy(model), device)

    def augment_fn(self, train_augment: TrainAugment | None) -> TrainAugment | None:
        return train_augment if self.augment else None

    def __repr__(self) -> str:
        keys = (self.epochs_key, "batch_size", "lr", "client_optimizer", "lr_scheduler")
        extra = {k: v for k, v in asdict_public(self.config).items() if k not in RunConfig.__dataclass_fields__}
        shown = {k: getattr(self.config, k) for k in keys} | extra
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
