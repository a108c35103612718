"""The Attack base class: a typed config with BackdoorBench's attack keys, and the poisoning steps every attack
shares (which training samples, which labels, which test samples).

A subclass sets ``config_class`` (a dataclass extending :class:`AttackConfig`, validated in ``validate``), builds
its trigger in :meth:`Attack.prepare_trigger` and implements :meth:`Attack.apply_trigger`; data-poisoning attacks
need nothing else. Training-controlled attacks
(WaNet) instead return a per-batch hook from :meth:`Attack.batch_hook` and build the bd_train record after
training in :meth:`Attack.materialize_bd_train`; attacks whose trigger learns with the victim (Input-aware) return
their own epoch from :meth:`Attack.prepare_training` and set ``dynamic_trigger``. Training, evaluation and writing the record are the runner's
business (:mod:`backdoorbench_gic.attacks.runner`). Register a subclass with ``@ATTACKS.register("name")``.

Poisoning follows BackdoorBench's BadNets flow (formats doc sections 2.1 and 8): ``round(pratio * N)`` training
indices drawn from all classes (target-class samples included; under all2one they keep their label), and bd_test
= every test sample whose label differs from the target (all2one) or the whole test set (all2all).
"""
from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from ..config import ConfigError, RunConfig, asdict_public, build_config, check_range, read_yaml, require
from ..data.imageset import Batch, ImageSet
from ..data.specs import DatasetSpec, get_spec
from ..data.transforms import nchw_to_nhwc_uint8
from ..records import PoisonedSplit
from ..registry import ATTACKS, MODELS, UnknownNameError

LabelTrans = typing.Literal["all2one", "all2all"]

# RunConfig keys that only defenses read; they are accepted in yaml files but get no command-line flag
DEFENSE_ONLY_KEYS = frozenset({"ratio", "index", "reserved_type", "result_file", "checkpoint_load",
                               "checkpoint_save", "log"})


@dataclass
class AttackConfig(RunConfig):
    """BackdoorBench's attack keys (``config/attack/prototype/<ds>.yaml`` plus ``config/attack/<a>/default.yaml``)
    with its defaults: PreActResNet-18, SGD lr 0.01 momentum 0.9 wd 5e-4, batch 128, cosine schedule, 100
    epochs, seed 0, all2one to target 0 with pratio 0.1. ``width`` is ours (a narrower network for CPU runs)."""

    attack: str = "prototype"
    dataset: str = "cifar10"
    model: str = "preactresnet18"
    width: int | None = None
    pratio: float = 0.1
    attack_target: int = 0
    attack_label_trans: LabelTrans = "all2one"
    attack_label_shift_amount: int = 1
    epochs: int = 100
    batch_size: int = 128
    save_folder_name: str | None = None
    bd_yaml_path: str | None = None

    def validate(self) -> None:
        super().validate()
        check_range(self, "epochs", 1)
        check_range(self, "pratio", 0, 1)
        check_range(self, "attack_target", 0)
        if self.width is not None:
            check_range(self, "width", 1)
        try:
            spec = get_spec(self.dataset)
        except KeyError as exc:
            raise ConfigError(f"key 'dataset': {exc.args[0]}") from None
        try:
            MODELS.resolve(self.model)
        except UnknownNameError as exc:
            raise ConfigError(f"key 'model': {exc}") from None
        k = spec.num_classes
        require(self.attack_target < k, "attack_target",
                f"{self.dataset} has {k} classes (0..{k - 1}), got {self.attack_target}")
        if self.attack_label_trans == "all2all":
            require(self.attack_label_shift_amount % k != 0, "attack_label_shift_amount",
                    f"all2all maps y to (y + shift) mod {k}; a shift of {self.attack_label_shift_amount} leaves every "
                    "label unchanged, so nothing would be poisoned")
        if self.save_folder_name is not None:
            name = self.save_folder_name
            require(bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name,
                    "save_folder_name", f"must be a plain folder name under record/ (no path separators), got {name!r}")


class Attack:
    """Config plus poisoning. Subclasses implement :meth:`apply_trigger` (and optionally override the hooks)."""

    config_class: ClassVar[type[AttackConfig]] = AttackConfig
    registry_name: ClassVar[str] = "attack"
    poisons: ClassVar[bool] = True  # False for clean (prototype) training
    clean_label: ClassVar[bool] = False  # poisoned training samples keep their labels
    writes_poison_index_list: ClassVar[bool] = True  # BackdoorBench's BadNets family writes train_poison_index_list
    dynamic_trigger: ClassVar[bool] = False  # the trigger is learnt with the victim: bd_test is made anew per epoch

    def __init__(self, config: AttackConfig | None = None, **overrides: Any):
        if config is None:
            config = build_config(self.config_class, [({"attack": self.registry_name}, "the attack class"),
                                                      (overrides, "keyword arguments")])
        elif overrides:
            config = build_config(self.config_class, [(asdict_public(config), "config"),
                                                      (overrides, "keyword arguments")])
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        else:
            config.validate()
        if ATTACKS.resolve(config.attack) != self.registry_name:
            raise ConfigError(f"key 'attack': {type(self).__name__} runs {self.registry_name!r}, but the config says "
                              f"{config.attack!r}; build the attack by name with build_attack(config) instead")
        self.config = config
        self.spec: DatasetSpec = get_spec(config.dataset)
        self.bb_root = Path(".").resolve()
        self._ready = False

    @classmethod
    def from_sources(cls, yaml_path: str | os.PathLike | None = None, bd_yaml_path: str | os.PathLike | None = None,
                     cli: Mapping[str, Any] | None = None) -> "Attack":
        """BackdoorBench's precedence: defaults < ``yaml_path`` (prototype) < ``bd_yaml_path`` (attack) < ``cli``."""
        return cls(build_config(cls.config_class, config_layers(cls.registry_name, yaml_path, bd_yaml_path, cli)))

    @property
    def name(self) -> str:
        return self.registry_name

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def __repr__(self) -> str:
        """torchattacks-style: the run's main settings plus every attack-specific key."""
        keys = ["dataset", "model", "width", "pratio", "attack_target", "attack_label_trans", "epochs", "lr",
                "random_seed"]
        keys += [k for k in self.config_class.__dataclass_fields__ if k not in AttackConfig.__dataclass_fields__]
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self.config, k)!r}' for k in keys)})"

    # -- set-up ------------------------------------------------------------------------------------------------
    def setup(self, bb_root: str | os.PathLike = ".") -> "Attack":
        """Build the trigger at the dataset's image size; ``bb_root`` anchors relative trigger paths. The poisoning
        methods call it (with the current directory) when nobody has."""
        self.bb_root = Path(bb_root).resolve()
        self.prepare_trigger()
        self._ready = True
        return self

    def _ensure_setup(self) -> None:
        if not self._ready:
            self.setup(self.bb_root)

    def prepare_trigger(self) -> None:
        """Subclasses: load or generate the trigger (``self.spec`` gives the image size)."""

    def resolve_path(self, key: str) -> Path:
        """A file named by config key ``key``: as given, else relative to the BackdoorBench root."""
        value = getattr(self.config, key)
        p = Path(value)
        candidates = [p] if p.is_absolute() else [self.bb_root / p, Path.cwd() / p]
        for c in candidates:
            if c.is_file():
                return c
        raise FileNotFoundError(f"key '{key}': file {value!r} not found (looked in "
                                f"{', '.join(str(c) for c in candidates)}); give an existing image, or leave "
                                f"{key} unset for the built-in trigger")

    # -- the trigger -------------------------------------------------------------------------------------------
    def apply_trigger(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 N x C x H x W -> poisoned uint8 N x C x H x W (``train`` selects the train or test trigger; call
        :meth:`setup` first)."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply_trigger")

    # -- labels and indices ----------------------------------------------------------------------------------
    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """all2one: the target; all2all: ``(y + shift) mod K``."""
        cfg = self.config
        if cfg.attack_label_trans == "all2one":
            return torch.full_like(labels, cfg.attack_target)
        return (labels + cfg.attack_label_shift_amount) % self.num_classes

    def train_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels the poisoned training samples get: the target labels, or unchanged for clean-label attacks."""
        return labels.clone() if self.clean_label else self.target_labels(labels)

    def num_poison(self, n_train: int) -> int:
        """``round(pratio * N)``, as BackdoorBench counts it (against the whole training set)."""
        return int(round(self.config.pratio * n_train))

    def select_train_indices(self, labels: torch.Tensor) -> np.ndarray:
        """Sorted training indices to poison: ``round(pratio * N)`` drawn from all classes, seeded."""
        n = len(labels)
        rng = np.random.RandomState(self.config.random_seed)
        return np.sort(rng.choice(n, size=self.num_poison(n), replace=False)).astype(np.int64)

    def test_indices(self, labels: torch.Tensor) -> np.ndarray:
        """bd_test: the non-target test samples (all2one) or all of them (all2all)."""
        if self.config.attack_label_trans == "all2one":
            return np.flatnonzero(labels.numpy() != self.config.attack_target).astype(np.int64)
        return np.arange(len(labels), dtype=np.int64)

    # -- poisoned sets ---------------------------------------------------------------------------------------
    def poison_train(self, train: ImageSet) -> tuple[ImageSet, PoisonedSplit | None]:
        """The set the victim trains on, and the bd_train split to record (None: made after training)."""
        self._ensure_setup()
        idx = self.select_train_indices(train.labels)
        images = self.apply_trigger(train.images[idx], train=True)
        labels = self.train_labels(train.labels[idx])
        view, split = poisoned_view(train, idx, images, labels, np.arange(len(train), dtype=np.int64), "bd_train")
        return view, split

    def poison_test(self, test: ImageSet) -> tuple[ImageSet, PoisonedSplit]:
        """The poisoned test subset (evaluated every epoch) and its record split; both hold the same 8-bit pixels."""
        self._ensure_setup()
        idx = self.test_indices(test.labels)
        images = self.apply_trigger(test.images[idx], train=False)
        labels = self.target_labels(test.labels[idx])
        full, split = poisoned_view(test, idx, images, labels, idx, "bd_test")
        return full.subset(torch.from_numpy(idx), name="bd_test"), split

    def batch_hook(self, generator: torch.Generator) -> Callable[[Batch], Batch] | None:
        """On-the-fly poisoning of training batches (training-controlled attacks); None for data poisoning."""
        return None

    def prepare_training(self, train: ImageSet, device: torch.device, generator: torch.Generator,
                         progress: bool | None = None) -> Callable[..., Any] | None:
        """Attacks that learn their trigger with the victim (Input-aware) do their pre-training here and return
        their own epoch function (``training.train_epoch``'s signature); None: the shared loop with
        :meth:`batch_hook`."""
        return None

    def materialize_bd_train(self, train: ImageSet) -> PoisonedSplit:
        """bd_train for attacks that poison on the fly: written after training (BackdoorBench issue #37)."""
        raise NotImplementedError(f"{type(self).__name__} poisons its data up front; it has no bd_train to materialise")

    def write_extras(self, record_dir: Path, record_name: str, test: ImageSet) -> list[Path]:
        """Attack-specific files beside the record (written before attack_result.pt); returns their paths."""
        return []

    def load_extras(self, record_dir: str | os.PathLike) -> "Attack":
        """Restore the trigger state a finished record's extras hold (a learnt generator, a crafted trigger), so
        :meth:`apply_trigger` poisons as the run did; nothing to do for attacks whose trigger the config fixes."""
        self._ensure_setup()
        return self


def poisoned_view(base: ImageSet, idx: np.ndarray, images: torch.Tensor, labels: torch.Tensor,
                  original_index_array: np.ndarray, name: str) -> tuple[ImageSet, PoisonedSplit]:
    """``base`` with ``images``/``labels`` substituted at ``idx`` and flagged, plus the matching record split."""
    pos = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    new_images = base.images.clone()
    new_labels = base.labels.clone()
    poison = torch.zeros(len(base), dtype=torch.long)
    if len(pos):
        new_images[pos] = images
        new_labels[pos] = labels
        poison[pos] = 1
    view = ImageSet(new_images, new_labels, base.labels.clone(), poison, base.indices.clone(), name=name)
    hwc = nchw_to_nhwc_uint8(images)
    split = PoisonedSplit(
        original_index_array=np.asarray(original_index_array, dtype=np.int64),
        images={int(i): hwc[j] for j, i in enumerate(idx)},
        labels={int(i): (int(labels[j]), int(base.labels[i])) for j, i in enumerate(idx)},
        split_size=len(base),
    )
    return view, split


def config_layers(attack: str | None, yaml_path=None, bd_yaml_path=None, cli: Mapping[str, Any] | None = None
                  ) -> list[tuple[Mapping[str, Any], str]]:
    """The (mapping, source) layers, lowest precedence first; None values on the command line are unset."""
    layers: list[tuple[Mapping[str, Any], str]] = []
    if attack:
        layers.append(({"attack": attack}, "the attack class"))
    for path in (yaml_path, bd_yaml_path):
        if path:
            layers.append((read_yaml(path), str(path)))
    if cli:
        layers.append(({k: v for k, v in cli.items() if v is not None}, "the command line"))
    paths = {k: str(v) for k, v in (("yaml_path", yaml_path), ("bd_yaml_path", bd_yaml_path)) if v}
    if paths:  # recorded in info.pickle, as BackdoorBench's args are
        layers.append((paths, "the yaml arguments"))
    return layers
