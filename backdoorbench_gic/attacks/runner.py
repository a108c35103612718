"""Running an attack end to end: poison, train the victim, and write the record BackdoorBench's attack scripts write.

``<bb_root>/record/<save_folder_name>/`` receives ``info.pickle`` (the args), the DEBUG log ``<timestamp>.log``,
``attack_df.csv`` / ``attack_df_summary.csv`` (one row per epoch), the two metric plots,
``train_poison_index_list.pickle`` (BadNets family), ``bd_train_dataset/`` and ``bd_test_dataset/`` PNG trees and,
written last and atomically, ``attack_result.pt``; clean (prototype) training writes ``clean_model.pth`` instead.
A folder holding either file is a finished run: it is never overwritten without ``overwrite``, and a killed run
never leaves one behind.

The metrics logged each epoch are computed on the same 8-bit poisoned test images the record stores, in fp32, with
the batch size ``bbgic inspect --evaluate`` uses, so re-evaluating the record reproduces the ``last`` row exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import string
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from ..utils.progress import progress_bar

from ..config import ConfigError, asdict_public, build_config
from ..data.datasets import open_dataset
from ..data.transforms import TrainAugment
from ..evaluation import evaluate
from ..models import build_model
from ..records import write_attack_record
from ..registry import ATTACKS, MODELS
from ..results import MetricLog, save_metric_plots
from ..training import make_optimizer, make_scheduler, step_scheduler, train_epoch
from ..utils.io import atomic_torch_save
from ..utils.logs import progress_enabled, run_log, timestamp
from ..utils.runtime import prepare_model, resolve_device, seed_everything
from .base import DEFENSE_ONLY_KEYS, Attack, AttackConfig, config_layers

log = logging.getLogger(__name__)

RECORD_FILE = "attack_result.pt"
CLEAN_MODEL_FILE = "clean_model.pth"
COMPLETION_FILES = (RECORD_FILE, CLEAN_MODEL_FILE)
GENERATED_TREES = ("bd_train_dataset", "bd_test_dataset", "cross_test_dataset")
CSV_PREFIX = "attack"
EVAL_BATCH_SIZE = 512  # the batch size `bbgic inspect --evaluate` re-evaluates with: identical arithmetic
ATTACK_COLUMNS = ("epoch", "train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
                  "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra")
CLEAN_COLUMNS = ("epoch", "train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch", "test_acc")


class RecordExistsError(FileExistsError, ValueError):
    """The record folder already holds a finished run."""


# ---------------------------------------------------------------------------------------------------------
# building attacks from names, dicts and yaml layers
# ---------------------------------------------------------------------------------------------------------
def build_attack(config: AttackConfig | Mapping[str, Any] | str, **overrides: Any) -> Attack:
    """An attack from its config object, a plain dict with an ``attack`` key, or a registered name."""
    if isinstance(config, str):
        return ATTACKS.get(config)(**overrides)
    if isinstance(config, AttackConfig):
        return ATTACKS.get(config.attack)(config, **overrides)
    if isinstance(config, Mapping):
        data = {**config, **overrides}
        if not data.get("attack"):
            raise ConfigError(f"an attack config needs an 'attack' key (one of {', '.join(ATTACKS.names())})")
        cls = ATTACKS.get(str(data["attack"]))
        data["attack"] = cls.registry_name  # an alias ("clean", "badnets") is recorded by its canonical name
        return cls(build_config(cls.config_class, [(data, "the config dict")]))
    raise TypeError(f"build_attack needs an AttackConfig, a dict or a name, got {type(config).__name__}")


def load_attack(attack: str | None = None, yaml_path: str | os.PathLike | None = None,
                bd_yaml_path: str | os.PathLike | None = None, cli: Mapping[str, Any] | None = None) -> Attack:
    """BackdoorBench's precedence: defaults < ``yaml_path`` < ``bd_yaml_path`` < ``cli`` (None values unset).

    The attack is ``attack`` if given, else the ``attack`` key of the highest layer that sets one."""
    layers = config_layers(None, yaml_path, bd_yaml_path, cli)
    name = attack
    if name is None:
        for data, _ in reversed(layers):
            if data.get("attack"):
                name = str(data["attack"])
                break
    if name is None:
        raise ConfigError(f"no attack named: pass --attack (one of {', '.join(ATTACKS.names())}) or set 'attack' "
                          "in the yaml file")
    cls = ATTACKS.get(name)
    # the chosen attack wins over an 'attack' key in a lower layer (a badnet yaml reused for blended, say)
    return cls(build_config(cls.config_class, [*layers, ({"attack": cls.registry_name}, "the --attack argument")]))


def attack_of_record(record) -> Attack:
    """The attack that made ``record`` (one of ours: its ``info.pickle`` holds the attack's keys), with its trigger
    state restored, so that :meth:`Attack.poison_test` poisons new images exactly as the record's bd_test was made.
    Raises ``ConfigError`` for a record whose info.pickle does not name one of our attacks."""
    from ..checkpoint import safe_torch_load

    info_path = Path(record.record_dir) / "info.pickle"
    if not info_path.is_file():
        raise ConfigError(f"{record.record_dir}: no info.pickle, so the attack that made this record is unknown")
    info = safe_torch_load(info_path)
    if not isinstance(info, Mapping) or info.get("attack") not in ATTACKS:
        raise ConfigError(f"{info_path}: does not name one of our attacks ({', '.join(ATTACKS.names())})")
    cls = ATTACKS.get(str(info["attack"]))
    keys = {f.name for f in dataclasses.fields(cls.config_class)}
    attack = cls(build_config(cls.config_class, [({k: v for k, v in info.items() if k in keys}, str(info_path))]))
    return attack.setup(record.bb_root).load_extras(record.record_dir)


def default_folder_name(attack: str) -> str:
    """BackdoorBench's generated name: ``<YYYYmmdd_HHMMSS>_<script>_attack_<attack>_<4 random alphanumerics>``."""
    rand = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(4))
    return f"{time.strftime('%Y%m%d_%H%M%S')}_{attack}_attack_{attack}_{rand}"


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------
def run_attack(config: AttackConfig | Mapping[str, Any] | Attack, *, bb_root: str | os.PathLike = ".",
               overwrite: bool = False, progress: bool | None = None) -> Path:
    """Poison, train and write ``<bb_root>/record/<save_folder_name>/``; returns that folder.

    ``config``: an :class:`AttackConfig` (its ``attack`` key picks the class), a plain dict of BackdoorBench keys,
    or a ready :class:`Attack`. Raises :class:`RecordExistsError` when the folder holds a finished run and
    ``overwrite`` is False; config problems (a sig ratio the target class cannot supply, ...) are raised before
    anything is written.
    """
    attack = config if isinstance(config, Attack) else build_attack(config)
    cfg = attack.config
    bb_root = Path(bb_root).resolve()
    name = cfg.save_folder_name or default_folder_name(attack.name)
    record_dir = bb_root / "record" / name
    _check_record_dir(record_dir, overwrite)

    started = time.time()
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.random_seed)
    dataset = open_dataset(cfg.dataset, cfg.dataset_path, bb_root)
    spec = dataset.spec
    train, test = dataset.train, dataset.test
    attack.setup(bb_root)
    if attack.poisons:
        train_set, bd_train = attack.poison_train(train)
        bd_test_set, bd_test = attack.poison_test(test)
    else:
        train_set, bd_train, bd_test_set, bd_test = train, None, None, None

    _clear_record_dir(record_dir)
    with run_log(record_dir, timestamp()) as log_path:
        log.info("%s: %s on %s (%d train / %d test images, %d classes), record %s", attack.name, cfg.model,
                 cfg.dataset, len(train), len(test), spec.num_classes, record_dir)
        log.debug("config: %s", attack_args(cfg))
        if bd_train is not None:
            log.info("bd_train: %d of %d training samples poisoned (%d label-flipped); bd_test: %d test samples",
                     len(bd_train.images), len(train), int((train_set.labels != train_set.original_labels).sum()),
                     len(bd_test_set))
        elif attack.poisons:
            log.info("training samples are poisoned per batch; bd_test: %d test samples", len(bd_test_set))
        info = _info_dict(cfg, spec, record_dir, bb_root, device)
        atomic_torch_save(info, record_dir / "info.pickle")

        torch.manual_seed(cfg.random_seed)  # initialisation does not depend on what the poisoning drew
        model = prepare_model(build_model(cfg.model, spec.num_classes, cfg.dataset, width=cfg.width), device)
        history = _train(attack, model, train_set, test, bd_test_set, generator, device, record_dir, progress)
        save_plots(history, record_dir)
        state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
        last = history.rows[-1]

        if not attack.poisons:
            atomic_torch_save(state, record_dir / CLEAN_MODEL_FILE)
            log.info("clean model: C-Acc %.4f after %d epochs (%.1fs); wrote %s", last["test_acc"], cfg.epochs,
                     time.time() - started, record_dir / CLEAN_MODEL_FILE)
            return record_dir

        if attack.dynamic_trigger:  # the record holds the triggers the final generator makes
            bd_test_set, bd_test = attack.poison_test(test)
        if bd_train is None:
            bd_train = attack.materialize_bd_train(train)
        if attack.writes_poison_index_list:
            indicator = np.zeros(len(train), dtype=np.float64)
            indicator[np.array(sorted(bd_train.images), dtype=np.int64)] = 1.0
            atomic_torch_save(indicator, record_dir / "train_poison_index_list.pickle")
        attack.write_extras(record_dir, name, test)
        write_attack_record(
            bb_root, name, model_name=MODELS.resolve(cfg.model), num_classes=spec.num_classes, state_dict=state,
            clean_data=cfg.dataset, img_size=spec.input_shape, bd_train=bd_train, bd_test=bd_test,
            data_path=data_path_of(cfg),
        )
        log.info("%s: C-Acc %.4f ASR %.4f RA %.4f after %d epochs (%.1fs); wrote %s (log %s)", attack.name,
                 last["test_acc"], last["test_asr"], last["test_ra"], cfg.epochs, time.time() - started,
                 record_dir / RECORD_FILE, log_path.name)
    return record_dir


def train_victim(attack: Attack, train, test, *, bb_root: str | os.PathLike = ".", progress: bool | None = False
                 ) -> tuple[torch.nn.Module, MetricLog]:
    """Poison ``train`` and train a victim on it as :func:`run_attack` does (same seeding, model, schedule and
    per-epoch metrics on ``test``), writing nothing: for quick screening runs on a subset of the data."""
    cfg = attack.config
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.random_seed)
    attack.setup(bb_root)
    train_set, _ = attack.poison_train(train)
    bd_test_set = attack.poison_test(test)[0] if attack.poisons else None
    torch.manual_seed(cfg.random_seed)
    model = prepare_model(build_model(cfg.model, attack.spec.num_classes, cfg.dataset, width=cfg.width), device)
    history = _train(attack, model, train_set, test, bd_test_set, generator, device, None, progress)
    return model, history


def _train(attack: Attack, model: torch.nn.Module, train_set, test, bd_test_set, generator: torch.Generator,
           device: torch.device, record_dir: Path | None, progress: bool | None) -> MetricLog:
    """The epochs: train (poisoning per batch where the attack does), step the schedule, evaluate, log a row."""
    cfg = attack.config
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    augment = TrainAugment.for_spec(attack.spec)
    hook = attack.batch_hook(generator) if attack.poisons else None
    epoch_fn = attack.prepare_training(train_set, device, generator, progress) if attack.poisons else None
    if epoch_fn is None:
        epoch_fn = train_epoch
    columns = ATTACK_COLUMNS if attack.poisons else CLEAN_COLUMNS
    history = MetricLog()
    bar = progress_bar(range(cfg.epochs), desc=f"{attack.name} {cfg.dataset}", disable=not progress_enabled(progress))
    for epoch in bar:
        t0 = time.time()
        stats = epoch_fn(model, train_set, optimizer, device=device, batch_size=cfg.batch_size, generator=generator,
                            augment=augment, amp=cfg.amp, batch_hook=hook, progress=progress,
                            desc=f"epoch {epoch + 1}/{cfg.epochs}")
        step_scheduler(scheduler, stats.loss)
        if attack.dynamic_trigger:  # the trigger moved with this epoch's training
            bd_test_set = attack.poison_test(test)[0]
        metrics = evaluate(model, test, bd_test_set, device=device, batch_size=EVAL_BATCH_SIZE, amp=False)
        values = {"epoch": epoch, **stats.as_row(), **metrics.as_row()}
        history.add({k: values[k] for k in columns})
        if record_dir is not None:
            history.save(record_dir, CSV_PREFIX)
        if attack.poisons:
            bar.set_postfix(acc=f"{metrics.acc:.3f}", asr=f"{metrics.asr:.3f}")
            log.info("epoch %d/%d: train loss %.4f acc %.4f | C-Acc %.4f ASR %.4f RA %.4f (%.1fs)", epoch + 1,
                     cfg.epochs, stats.loss, stats.acc, metrics.acc, metrics.asr, metrics.ra, time.time() - t0)
        else:
            bar.set_postfix(acc=f"{metrics.acc:.3f}")
            log.info("epoch %d/%d: train loss %.4f acc %.4f | C-Acc %.4f (%.1fs)", epoch + 1, cfg.epochs, stats.loss,
                     stats.acc, metrics.acc, time.time() - t0)
    return history


# ---------------------------------------------------------------------------------------------------------
# the record folder
# ---------------------------------------------------------------------------------------------------------
def _check_record_dir(record_dir: Path, overwrite: bool) -> None:
    done = [f for f in COMPLETION_FILES if (record_dir / f).exists()]
    if done and not overwrite:
        raise RecordExistsError(f"{record_dir} already holds a finished run ({done[0]}); pass --overwrite "
                                "(overwrite=True) to replace it, or choose another --save_folder_name")


def _clear_record_dir(record_dir: Path) -> None:
    """Remove what a previous (finished or killed) run left: completion files first, so the folder never looks
    finished while its contents are being replaced, then the poisoned-image trees."""
    removed = []
    for f in COMPLETION_FILES:
        if (record_dir / f).exists():
            (record_dir / f).unlink()
            removed.append(f)
    for tree in GENERATED_TREES:
        if (record_dir / tree).is_dir():
            shutil.rmtree(record_dir / tree)
            removed.append(tree + "/")
    if removed:
        log.warning("reusing record folder %s: removed %s of a previous run", record_dir, ", ".join(removed))


def data_path_of(cfg: AttackConfig) -> str:
    """BackdoorBench's stored ``data_path``: ``<dataset_path>/<dataset>`` (e.g. ``./data/cifar10``); for a
    BackdoorBenchER split the split's folder, so the reserved part stays identifiable and unseen."""
    return f"{cfg.dataset_path.rstrip('/')}/{cfg.dataset}"


def _info_dict(cfg: AttackConfig, spec, record_dir: Path, bb_root: Path, device: torch.device) -> dict[str, Any]:
    """The args as BackdoorBench's info.pickle holds them (plain types only: loads with weights_only=True)."""
    h, w, c = spec.input_shape
    info = attack_args(cfg)
    info.update(num_classes=spec.num_classes, input_height=h, input_width=w, input_channel=c, img_size=[h, w, c],
                data_path=data_path_of(cfg), save_path=str(record_dir), bb_root=str(bb_root),
                device_used=str(device), torch_version=torch.__version__)
    return _plain(info)


def attack_args(cfg: AttackConfig) -> dict[str, Any]:
    """The config's keys without those only defenses read (RunConfig carries both)."""
    return {k: v for k, v in asdict_public(cfg).items() if k not in DEFENSE_ONLY_KEYS}


def _plain(value: Any) -> Any:
    """Built-in types only (a str subclass such as torch's TorchVersion would need an unsafe pickle global)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    for t in (bool, int, float, str):
        if isinstance(value, t):
            return t(value)
    return str(value)


def save_plots(history: MetricLog, record_dir: Path) -> None:
    try:
        save_metric_plots(history, record_dir)
    except Exception as exc:  # a plot must never cost a record
        log.warning("could not draw metric plots: %s", exc)
