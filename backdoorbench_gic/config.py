"""Typed, validated configuration with BackdoorBench's precedence.

Layers, lowest first: the dataclass defaults < ``defense_configs/<name>/<dataset>.yaml`` (or ``config.yaml``)
< ``--yaml_path`` < explicit CLI flags. Every layer is checked against the dataclass: an unknown key or a
value of the wrong type is a :class:`ConfigError` that names the key and where it came from (file or
command line). BackdoorBench's key names are used as written (epochs, batch_size, lr, lr_scheduler,
sgd_momentum, wd, ratio, index, amp, device, random_seed, ...).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from .resources import defense_configs_dir

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; says which key, where it came from and what is expected."""


# ---------------------------------------------------------------------------------------------------------
# value coercion
# ---------------------------------------------------------------------------------------------------------
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Convert ``value`` to annotation ``tp`` where the meaning is unambiguous, else raise TypeError.

    Accepts what YAML and argparse produce: PyYAML reads ``1e-4`` as a string, so numeric strings become
    numbers; ``"true"/"false"`` become bools; an int is a valid float; a float with no fraction a valid int.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str):
            for c in choices:
                if isinstance(c, str) and c.lower() == value.lower():
                    return c
        raise TypeError(f"expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value.strip("[]() ")) if v]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected {_type_name(tp)}, got {value!r}")
        out = [coerce(v, inner) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TypeError(f"expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(f"expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise TypeError(f"expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise TypeError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(f"expected {_type_name(tp)}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# what a config's fields say about themselves
# ---------------------------------------------------------------------------------------------------------
class SelfChecking:
    """A config dataclass whose ``validate()`` runs when an instance is made (``__post_init__``): an instance is
    valid by construction, so whoever is handed one (a defense, GIC, a wrapper) uses it as it is."""

    def __post_init__(self) -> None:
        self.validate()  # type: ignore[attr-defined]

    def validate(self) -> None:
        """Range and consistency checks; raise :class:`ConfigError` naming the key."""


def not_identity(default: Any = None, **kw: Any) -> Any:
    """A field that does not change what its config computes (where or how fast it runs, a cache switch, a seed
    that enters a key by another way): left out of :func:`identity`, so of every cache key built from it."""
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata={"identity": False})
    return field(default=default, metadata={"identity": False})


def per_run(default: Any = None) -> Any:
    """A run-level field that differs from cell to cell of one matrix entry by design (the seed, the auxiliary
    draw): part of a run's identity, not of the settings that entry was computed with."""
    return field(default=default, metadata={"per_run": True})


def identity(cfg: Any, cls: type | None = None) -> dict[str, Any]:
    """The fields of ``cfg`` (those of ``cls`` only, when given) that determine what it computes, by value: every
    field not marked :func:`not_identity`. Cache keys are built from this, so a new field cannot be forgotten."""
    return {f.name: getattr(cfg, f.name) for f in fields(cls or cfg) if f.metadata.get("identity", True)}


def marked_keys(cls: type, flag: str) -> frozenset[str]:
    """The fields of ``cls`` whose metadata has ``flag`` (``per_run``) or, for ``identity``, marks it False."""
    if flag == "identity":
        return frozenset(f.name for f in fields(cls) if not f.metadata.get("identity", True))
    return frozenset(f.name for f in fields(cls) if f.metadata.get(flag))


# ---------------------------------------------------------------------------------------------------------
# building dataclasses from layered mappings
# ---------------------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init]


def check_mapping(cls: type, data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate keys and coerce types of one layer; returns the coerced values."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of key: value, got {type(data).__name__}")
    hints = _hints(cls)
    known = set(config_keys(cls))
    aliases: dict[str, str] = getattr(cls, "KEY_ALIASES", {})
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_") if str(raw_key).replace("-", "_") in known else str(raw_key)
        key = aliases.get(key, key)
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown key {raw_key!r} in {source} for {cls.__name__}.{hint} "
                f"Known keys: {', '.join(sorted(known))}"
            )
        try:
            out[key] = coerce(value, hints[key])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"key {key!r} in {source}: {exc}") from None
    return out


def build_config(cls: type[T], layers: list[tuple[Mapping[str, Any], str]]) -> T:
    """Merge ``(mapping, source name)`` layers, lowest precedence first, into a validated ``cls``.

    Range checks live in the dataclass's ``validate()``; its errors are re-raised naming the layer that set
    the offending key.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for data, source in layers:
        if data is None:
            continue
        for k, v in check_mapping(cls, data, source).items():
            merged[k] = v
            origin[k] = source
    missing = [f.name for f in fields(cls) if f.init and f.name not in merged
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{cls.__name__} needs the key(s) {', '.join(missing)}; none of "
                          f"{', '.join(s for _, s in layers) or 'the given layers'} sets them")
    try:
        obj = cls(**merged)
        if not isinstance(obj, SelfChecking) and hasattr(obj, "validate"):
            obj.validate()
    except ConfigError as exc:
        raise ConfigError(_with_origin(str(exc), origin)) from None
    return obj


def _with_origin(message: str, origin: Mapping[str, str]) -> str:
    m = re.match(r"^key '([^']+)'", message)
    if m and m.group(1) in origin and " (from " not in message:
        return f"{message} (from {origin[m.group(1)]})"
    return message


def parse_key_value(text: str, flag: str = "--option") -> tuple[str, Any]:
    """One ``KEY=VALUE`` command-line item -> ``(key, value)``, the value typed as JSON where it parses as JSON
    (``1e-3`` is a number, ``true`` a bool, ``[1, 2]`` a list), else as YAML (``yes``, ``{a: 1}``, plain strings).
    ``flag`` names the option in the error."""
    if not isinstance(text, str) or "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"{flag} needs KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), json.loads(raw)
    except ValueError:
        pass
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} {text!r}: the value is neither JSON nor YAML ({exc})") from None


def parse_key_values(items: Iterable[str], flag: str = "--option") -> dict[str, Any]:
    """Repeated ``KEY=VALUE`` items (:func:`parse_key_value`) -> a dict; a later item overrides an earlier one."""
    return dict(parse_key_value(item, flag) for item in items)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"yaml file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data


def base_dataset_name(dataset: str | None) -> str | None:
    """``cifar10_split_5_seed_0`` -> ``cifar10`` (BackdoorBenchER names per-dataset settings by the base)."""
    if dataset is None:
        return None
    return dataset.split("_split_")[0]


def default_yaml_for(name: str, dataset: str | None, configs_dir: Path | None = None) -> Path | None:
    """``defense_configs/<name>/<dataset>.yaml``, else ``config.yaml`` there, else None."""
    root = configs_dir or defense_configs_dir()
    folder = root / name
    ds = base_dataset_name(dataset)
    for candidate in ([folder / f"{ds}.yaml"] if ds else []) + [folder / "config.yaml"]:
        if candidate.is_file():
            return candidate
    return None


def config_layers(name: str, dataset: str | None = None, yaml_path: str | Path | None = None,
                  cli: Mapping[str, Any] | None = None,
                  configs_dir: Path | None = None) -> list[tuple[Mapping[str, Any], str]]:
    """The (values, source) layers in BackdoorBench's precedence: packaged ``<name>/<dataset>.yaml`` <
    ``yaml_path`` < ``cli`` (None values in cli are unset)."""
    layers: list[tuple[Mapping[str, Any], str]] = []
    packaged = default_yaml_for(name, dataset, configs_dir)
    if packaged is not None:
        layers.append((read_yaml(packaged), str(packaged)))
    if yaml_path:
        layers.append((read_yaml(yaml_path), str(yaml_path)))
    if cli:
        layers.append(({k: v for k, v in cli.items() if v is not None}, "the command line"))
    return layers


def load_config(
    cls: type[T],
    name: str,
    dataset: str | None = None,
    yaml_path: str | Path | None = None,
    cli: Mapping[str, Any] | None = None,
    configs_dir: Path | None = None,
) -> T:
    """Defaults < packaged ``<name>/<dataset>.yaml`` < ``yaml_path`` < ``cli`` (None values in cli are unset)."""
    layers = config_layers(name, dataset, yaml_path, cli, configs_dir)
    if dataset is not None and "dataset" in config_keys(cls):
        # an explicit --dataset wins over a yaml's (BackdoorBench's yamls carry wrong dataset values)
        layers.append(({"dataset": dataset}, "the --dataset argument"))
    return build_config(cls, layers)


def asdict_public(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if not f.name.startswith("_")}


# ---------------------------------------------------------------------------------------------------------
# common checks for validate() methods
# ---------------------------------------------------------------------------------------------------------
def require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"key '{key}': {message}")


def check_range(cfg: Any, key: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> None:
    v = getattr(cfg, key)
    if v is None:
        return
    if lo is not None:
        ok = v > lo if lo_open else v >= lo
        require(ok, key, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None:
        require(v <= hi, key, f"must be <= {hi}, got {v}")


# ---------------------------------------------------------------------------------------------------------
# the common BackdoorBench defense keys
# ---------------------------------------------------------------------------------------------------------
Scheduler = typing.Literal["CosineAnnealingLR", "StepLR", "MultiStepLR", "ReduceLROnPlateau", "none"]


@dataclass
class RunConfig(SelfChecking):
    """Keys every BackdoorBench defense yaml carries. Runtime-only keys (pin_memory, prefetch, ...) are
    accepted so that their yaml files load unchanged; those marked 'accepted' have no effect here.

    Fields marked :func:`not_identity` change where or how fast a run goes, not what it computes (the purified-model
    cache and the configuration fingerprint leave them out); those marked :func:`per_run` differ between the cells
    of one matrix entry by design (the fingerprint leaves them out, the cache keeps them)."""

    # runtime
    device: str = not_identity("auto")
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    pin_memory: bool = not_identity(True)  # accepted
    non_blocking: bool = not_identity(True)  # accepted
    prefetch: bool = not_identity(False)  # accepted
    num_workers: int = not_identity(0)  # accepted: data is held in memory as tensors
    frequency_save: int = not_identity(0)  # accepted
    # paths and inputs
    dataset: str | None = None
    dataset_path: str = not_identity("./data")
    model: str | None = None
    result_file: str | None = not_identity(None)
    checkpoint_load: str | None = not_identity(None)  # accepted
    checkpoint_save: str | None = not_identity(None)  # accepted
    log: str | None = not_identity(None)  # accepted
    yaml_path: str | None = not_identity(None)
    # training
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.01
    lr_scheduler: str | None = "CosineAnnealingLR"
    client_optimizer: str = "sgd"
    sgd_momentum: float = 0.9
    wd: float = 5e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    steplr_stepsize: int = 1
    steplr_gamma: float = 0.1
    steplr_milestones: list[int] = field(default_factory=lambda: [30, 60])
    cos_t_max: int | None = None  # None: T_max = epochs (BackdoorBench uses 100 regardless; see docs)
    random_seed: int = per_run(0)
    # clean / auxiliary data
    ratio: float = per_run(0.05)
    index: str | None = per_run(None)
    reserved_type: str = per_run("train")

    def validate(self) -> None:
        check_range(self, "epochs", 0)
        check_range(self, "batch_size", 1)
        check_range(self, "lr", 0, lo_open=True)
        check_range(self, "sgd_momentum", 0, 1)
        check_range(self, "wd", 0)
        check_range(self, "ratio", 0, 1, lo_open=True)
        check_range(self, "num_workers", 0)
        require(self.client_optimizer.lower() in ("sgd", "adam", "adamw", "adadelta"), "client_optimizer",
                f"must be sgd, adam, adamw or adadelta, got {self.client_optimizer!r}")
        if self.lr_scheduler is not None:
            known = ("cosineannealinglr", "steplr", "multisteplr", "reducelronplateau", "none", "")
            require(self.lr_scheduler.lower() in known, "lr_scheduler",
                    f"must be one of CosineAnnealingLR, StepLR, MultiStepLR, ReduceLROnPlateau or none, got {self.lr_scheduler!r}")
