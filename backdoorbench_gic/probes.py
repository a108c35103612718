"""Post-purification probes: is a low ASR after purification a removed backdoor, or a superficial one?

Min et al. ("Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense", NeurIPS 2024,
arXiv 2410.09838) show that purified models re-learn their backdoor from a handful of poisoned samples. Two probes
measure that on any model (ours, or a BackdoorBench ``defense_result.pt`` through :func:`load_purified`), and on
the unpurified victim, so that a table can show before / after / after refresh / after retuning:

- ``refresh`` (**ASR-refresh**): the model's BatchNorm running statistics are reset and re-estimated (train-mode
  passes, cumulative average, batches of ``refresh.batch_size`` in order; no random draw) on the clean test split's
  *first half* (test indices ``0 .. n//2 - 1``), the clean in-distribution images an evaluator holds: the benign
  version of what a deployer's own adaptation does. ASR-refresh is then measured on the poisoned versions of the
  *second half* only (the evaluation set's bd_test images whose test index is ``>= n//2``), never on an image the
  statistics saw; plain ASR on that same half (``asr_half``) is reported beside it, so the two compare on the same
  images. C-Acc on the second half's clean images is reported as ``acc_half`` / ``acc_refresh``.
- ``retune`` (**P-ASR**, post-retuning ASR): a short retuning attack fine-tunes a copy of the model on a small set
  drawn from the record's *training* split, a share of it the attack's own poisoned training images (the record's
  bd_train), then ASR and C-Acc are measured on the evaluation sets. The same retuning of a **clean control** (a
  model of the victim's architecture trained on the record's clean training data, or a given clean model) says how
  fast a never-backdoored model learns the trigger from those samples; P-ASR well above the control's means the
  purified model kept what the retuning reactivates.

Default settings, fixed once on the victim and the clean control (never on defense results), before any comparison:

- retuning set: 1 % of the clean training split (``retune.fraction`` 0.01, or ``retune.n`` images), 10 % of it
  poisoned (``retune.poison_share`` 0.1): distinct training indices, the poisoned ones drawn among bd_train's
  poisoned samples (poisoned image and label), the clean ones among the never-poisoned samples (clean image, true
  label); the draw is seeded by ``seed``;
- retuning: 5 epochs (``retune.epochs``), batch 64, SGD lr 0.01, momentum 0.9, weight decay 5e-4, constant rate, the
  dataset's train augmentation (``retune.augment``), data order and augmentation seeded by ``seed``;
- clean control: trained with the victim's own schedule where the record says it (our ``info.pickle``, read with
  the safe loader), else BackdoorBench's prototype defaults (100 epochs, batch 128, SGD lr 0.01, cosine), each
  overridable under ``control``; cached by content under ``$BBGIC_CACHE_DIR/../clean_control``, keyed by the
  record's clean training data, the architecture and the settings. ``control.model`` names a given clean model
  instead (a ``clean_model.pth``, a state-dict file, a ``{'model': state}`` file, or a folder holding one).

How they were fixed (rule written before measuring): the retuning settings are the example of issue 24 (1 %, 10 %
poisoned, 5 epochs, SGD lr 0.01), kept if, on the Fashion-MNIST victim, the clean control's P-ASR at them is at most
20 % (the control must not learn the trigger from the retuning set alone, or P-ASR could not tell a superficial
removal from a real one) while the victim's stays high; otherwise the poisoned share would be halved until it is.
Measured (``benchmarks/probe_cost.py``, BadNets PreActResNet-18 w16 on Fashion-MNIST): control P-ASR 7.2 %, victim
98.8 %: kept. On MNIST's small CNN they wreck the clean control and the WaNet victim (held-out C-Acc 21 % and 10 %);
``benchmarks/probe_defaults.py`` picks a domain's setting on held-out data of the victims and the control (MNIST:
``retune.lr`` 0.001, ``retune.poison_share`` 0.05, given in the spec's ``probe_options``). On a Blended MNIST victim
the clean control learns the trigger from the retuning set under every candidate: P-ASR says nothing there.

The victim's and the control's probe results are cached by content (weights, settings, data) like the victim's
metrics, so the cells of a matrix pay only for their purified model. A probe that cannot run on a record (retune
without bd_train, refresh without BatchNorm, a retuning budget larger than the training split) is refused by
:func:`check_probes` before any model is built or any defense runs.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .config import ConfigError, build_config, check_range
from .data.imageset import ImageSet
from .evaluation import Metrics, evaluate
from .keys import Col
from .utils.cache import cache_dir, hash_images, hash_weights
from .utils.io import atomic_torch_save, atomic_write_json
from .utils.logs import progress_enabled
from .utils.progress import progress_bar
from .utils.runtime import make_generator, prepare_model

log = logging.getLogger(__name__)

PROBES = ("refresh", "retune")
PROBE_TITLES = {"refresh": "ASR-refresh", "retune": "P-ASR"}


class ProbeError(ValueError):
    """A probe asked of a record or model it cannot run on; the message names the probe and the reason."""


# ---------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RefreshSettings:
    batch_size: int = 256  # batches of the BatchNorm re-estimation passes (a cumulative average over them)

    def validate(self) -> None:
        check_range(self, "batch_size", 1)


@dataclass
class RetuneSettings:
    fraction: float = 0.01  # share of the clean training split in the retuning set
    n: int | None = None  # or this many images (instead of the fraction)
    poison_share: float = 0.1  # share of the retuning set that is the attack's poisoned training images
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    sgd_momentum: float = 0.9
    wd: float = 5e-4
    augment: bool = True  # the dataset's train augmentation, as fine-tuning uses it

    def validate(self) -> None:
        check_range(self, "fraction", 0, 1, lo_open=True)
        check_range(self, "n", 1)
        check_range(self, "poison_share", 0, 1, lo_open=True)
        check_range(self, "epochs", 1)
        check_range(self, "batch_size", 1)
        check_range(self, "lr", 0, lo_open=True)
        check_range(self, "sgd_momentum", 0, 1)
        check_range(self, "wd", 0)

    def budget(self, n_split: int) -> tuple[int, int]:
        """(images in the retuning set, of which poisoned) for a training split of ``n_split`` images."""
        n = self.n if self.n is not None else int(round(self.fraction * n_split))
        return n, int(round(self.poison_share * n))


@dataclass
class ControlSettings:
    model: str | None = None  # a given clean model (file or folder); None: train one (cached)
    epochs: int | None = None  # None: the victim's schedule (info.pickle), else BackdoorBench's prototype default
    batch_size: int | None = None
    lr: float | None = None

    def validate(self) -> None:
        check_range(self, "epochs", 1)
        check_range(self, "batch_size", 1)
        check_range(self, "lr", 0, lo_open=True)


@dataclass
class ProbeSettings:
    """The probes' settings: nested sections ``refresh``, ``retune``, ``control`` and one ``seed``."""

    seed: int = 0
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    retune: RetuneSettings = field(default_factory=RetuneSettings)
    control: ControlSettings = field(default_factory=ControlSettings)

    SECTIONS = {"refresh": RefreshSettings, "retune": RetuneSettings, "control": ControlSettings}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, source: str = "the probe options") -> "ProbeSettings":
        """From a plain (nested) dict, e.g. ``{"retune": {"epochs": 3}, "seed": 1}``; dotted keys
        (``"retune.epochs": 3``, as ``--probe_option`` gives them) are nested first. An unknown key is an error."""
        nested = nest_options(data or {}, source)
        unknown = sorted(set(nested) - {"seed", *cls.SECTIONS})
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(map(repr, unknown))} in {source}; known: seed, "
                              f"{', '.join(cls.SECTIONS)} (each a mapping, or dotted keys such as retune.epochs)")
        parts: dict[str, Any] = {}
        for name, section in cls.SECTIONS.items():
            values = nested.get(name) or {}
            if not isinstance(values, Mapping):
                raise ConfigError(f"'{name}' in {source} must be a mapping of its keys, got {values!r}")
            parts[name] = build_config(section, [(values, f"{source} ({name})")])
        try:
            seed = int(nested.get("seed", 0))
        except (TypeError, ValueError):
            raise ConfigError(f"key 'seed' in {source}: expected an int, got {nested.get('seed')!r}") from None
        return cls(seed=seed, **parts)

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **{name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}}

    def fingerprint(self) -> str:
        """A short hash of the settings (carried by every probed row, so rows probed differently are told apart)."""
        return hashlib.sha1(json.dumps(self.as_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def nest_options(data: Mapping[str, Any], source: str = "the probe options") -> dict[str, Any]:
    """``{"retune.epochs": 3}`` -> ``{"retune": {"epochs": 3}}`` (nested mappings pass through)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        head, _, rest = str(key).partition(".")
        if rest:
            section = out.setdefault(head, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: {key!r} and {head!r} both set {head}")
            section[rest] = value
        elif isinstance(value, Mapping):
            section = out.setdefault(head, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: {head!r} given twice")
            section.update(value)
        else:
            out[head] = value
    return out


def parse_probes(text: str | Iterable[str] | None) -> list[str]:
    """``"refresh,retune"`` (or a list) -> the probe names, in PROBES order; an unknown name is an error."""
    if text is None:
        return []
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    unknown = [t for t in items if t not in PROBES]
    if unknown:
        raise ProbeError(f"unknown probe(s) {', '.join(map(repr, unknown))}: use refresh (ASR-refresh) and/or "
                         "retune (P-ASR), comma-separated")
    return [p for p in PROBES if p in items]


# ---------------------------------------------------------------------------------------------------------
# checks before anything is loaded
# ---------------------------------------------------------------------------------------------------------
def has_running_bn(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a network's state dict holds BatchNorm running statistics."""
    return any(k.endswith("running_mean") for k in state_dict)


def check_probes(record, probes: Iterable[str], settings: ProbeSettings | None = None) -> ProbeSettings:
    """Refuse, with the probe's name and the reason, what cannot run on ``record``: ``retune`` without the attack's
    poisoned training data (or with missing bd_train PNGs), ``refresh`` on a network without BatchNorm running
    statistics, a retuning budget larger than the training split or than its poisoned part, a clean control file
    that does not exist. Reads the record's stored facts only (no model is built, no dataset is read)."""
    probes = parse_probes(list(probes))
    settings = settings or ProbeSettings()
    if "refresh" in probes and not has_running_bn(record.state_dict):
        raise ProbeError(f"probe 'refresh' (ASR-refresh) re-estimates BatchNorm running statistics, but the "
                         f"{record.model_name} of record {record.name} has no BatchNorm layer with running "
                         "statistics; drop 'refresh' from the probes for this model")
    if "retune" in probes:
        state = record.bd_train_state
        if state is None or not state.entries:
            raise ProbeError(f"probe 'retune' (P-ASR) fine-tunes with a few of the attack's own poisoned training "
                             f"images (the record's bd_train), but record {record.name} holds no poisoned training "
                             "data; drop 'retune' from the probes, or use a record that keeps bd_train")
        n_split, n_poisoned = int(len(state.poison_indicator)), len(state.entries)
        n, n_poison = settings.retune.budget(n_split)
        if n > n_split:
            raise ProbeError(f"probe 'retune' (P-ASR): a retuning budget of {n} images is larger than the clean "
                             f"training split of record {record.name} ({n_split} images); lower retune.n or "
                             "retune.fraction")
        if n_poison < 1:
            raise ProbeError(f"probe 'retune' (P-ASR): {settings.retune.poison_share:g} of a {n}-image retuning set "
                             "is no poisoned image; raise retune.fraction (or retune.n) or retune.poison_share")
        if n_poison > n_poisoned:
            raise ProbeError(f"probe 'retune' (P-ASR): the retuning set needs {n_poison} poisoned images but record "
                             f"{record.name} has {n_poisoned}; lower retune.poison_share or the budget")
        if n - n_poison > n_split - n_poisoned:
            raise ProbeError(f"probe 'retune' (P-ASR): the retuning set needs {n - n_poison} never-poisoned training "
                             f"images but record {record.name} has {n_split - n_poisoned}; lower the budget")
        missing = record.missing_pngs("bd_train")
        if missing:
            raise ProbeError(f"probe 'retune' (P-ASR): {len(missing)} of record {record.name}'s bd_train PNGs are "
                             f"missing (first: {missing[0]}); pass --bb_root <the BackdoorBench root of the record>")
        if settings.control.model is not None and not Path(settings.control.model).exists():
            raise ProbeError(f"probe 'retune' (P-ASR): the clean control control.model={settings.control.model!r} "
                             "does not exist; give a clean model file or folder, or leave it unset to train one")
    return settings


def probe_request(record, probes: Iterable[str] | str, options: Mapping[str, Any] | None = None) -> ProbeSettings:
    """A run's probe request checked against its record (:func:`check_probes`): the settings from ``options``
    (options without a probe to use them are an error, not silently ignored)."""
    names = parse_probes(probes)
    if options and not names:
        raise ProbeError(f"probe options {', '.join(map(str, options))} given without a probe to use them; add "
                         "--probes refresh,retune (or probes: in the matrix spec)")
    return check_probes(record, names, ProbeSettings.from_dict(options))


# ---------------------------------------------------------------------------------------------------------
# the probes on one model
# ---------------------------------------------------------------------------------------------------------
def split_halves(clean_test: ImageSet, clean_eval: ImageSet, bd_eval: ImageSet | None
                 ) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """(refresh images: the clean test split's first half by test index; the evaluation set's clean images and
    poisoned images of the second half)."""
    half = len(clean_test) // 2
    refresh = clean_test.subset(torch.nonzero(clean_test.indices < half).flatten(), name="clean test, first half")
    clean_m = clean_eval.subset(torch.nonzero(clean_eval.indices >= half).flatten(), name="clean test, second half")
    bd_m = None if bd_eval is None else bd_eval.subset(torch.nonzero(bd_eval.indices >= half).flatten(),
                                                       name="bd test, second half")
    return refresh, clean_m, bd_m


def refreshed(model: torch.nn.Module, images: ImageSet, batch_size: int, device: torch.device) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``images`` (weights untouched)."""
    from .bnstats import batchnorm_layers, recalibrate_bn

    net = prepare_model(copy.deepcopy(model), device)
    if not batchnorm_layers(net):
        raise ProbeError(f"probe 'refresh' (ASR-refresh): {type(getattr(net, 'net', net)).__name__} has no BatchNorm "
                         "layer with running statistics to re-estimate")
    recalibrate_bn(net, images, batch_size=batch_size, device=device)
    return net.eval()


def retune_set(record, settings: RetuneSettings, seed: int) -> ImageSet:
    """The retuning set: distinct training indices, ``poison_share`` of them poisoned samples of bd_train (poisoned
    image and label), the rest never-poisoned samples (clean image, true label); drawn with ``seed``."""
    bd, clean = record.bd_train, record.clean_train
    n, n_poison = settings.budget(len(clean))
    g = make_generator(seed)
    poisoned = torch.nonzero(bd.poison == 1).flatten()
    never = torch.nonzero(bd.poison == 0).flatten()
    pick_p = poisoned[torch.randperm(len(poisoned), generator=g)[:n_poison]]
    pick_c = never[torch.randperm(len(never), generator=g)[:n - n_poison]]
    return ImageSet.concat([clean.subset(pick_c), bd.subset(pick_p)], name=f"retune ({n - n_poison} clean + "
                                                                          f"{len(pick_p)} poisoned)")


def retuned(model: torch.nn.Module, data: ImageSet, settings: RetuneSettings, seed: int, device: torch.device,
            augment=None, progress: bool | None = None) -> torch.nn.Module:
    """A copy of ``model`` fine-tuned on ``data`` (SGD, constant rate, cross-entropy), data order seeded by ``seed``."""
    from .training import make_optimizer, train_epoch

    net = prepare_model(copy.deepcopy(model), device)
    optimizer = make_optimizer(net.parameters(), settings)
    g = make_generator(seed)
    for epoch in progress_bar(range(settings.epochs), desc="retune", disable=not progress_enabled(progress)):
        stats = train_epoch(net, data, optimizer, device=device, batch_size=settings.batch_size, generator=g,
                            augment=augment if settings.augment else None, progress=progress,
                            desc=f"retune epoch {epoch}")
        log.debug("retune epoch %d/%d: loss %.4f, train acc %.4f", epoch + 1, settings.epochs, stats.loss, stats.acc)
    return net.eval()


# ---------------------------------------------------------------------------------------------------------
# the clean control
# ---------------------------------------------------------------------------------------------------------
_SCHEDULE_KEYS = ("epochs", "batch_size", "lr", "lr_scheduler", "client_optimizer", "sgd_momentum", "wd",
                  "adam_betas", "steplr_stepsize", "steplr_gamma", "steplr_milestones", "cos_t_max")


def victim_schedule(record) -> dict[str, Any]:
    """The victim's training schedule as its record's ``info.pickle`` holds it (ours, loaded with the safe loader);
    empty when absent or unreadable (BackdoorBench writes a plain pickle we do not unpickle)."""
    from .checkpoint import load_allowlisted

    path = Path(record.record_dir) / "info.pickle"
    if not path.is_file():
        return {}
    try:
        info = load_allowlisted(path)
    except Exception as exc:  # not our format: fall back to the defaults, say so
        log.info("clean control: %s is not readable with the safe loader (%s); using the prototype defaults", path,
                 str(exc).splitlines()[0][:120])
        return {}
    return {k: info[k] for k in _SCHEDULE_KEYS if isinstance(info, Mapping) and info.get(k) is not None}


def control_config(record, settings: ControlSettings, seed: int, device: str) -> dict[str, Any]:
    """The clean (prototype) training config of the control: victim's architecture and data, the victim's schedule
    (else the prototype defaults) with ``settings`` over it; ``pratio`` 0 (nothing poisoned)."""
    from .models.build import infer_arch_kwargs

    arch = infer_arch_kwargs(record.model_name, record.state_dict)
    cfg: dict[str, Any] = {**victim_schedule(record), "attack": "prototype", "dataset": record.clean_data,
                           "model": record.model_name, "pratio": 0.0, "random_seed": seed, "device": device}
    if "width" in arch:
        cfg["width"] = arch["width"]
    for key in ("epochs", "batch_size", "lr"):
        if getattr(settings, key) is not None:
            cfg[key] = getattr(settings, key)
    return cfg


def _given_state(path: str | Path, trust: bool = False) -> Mapping[str, torch.Tensor]:
    from .checkpoint import normalize_state_dict, safe_torch_load

    p = Path(path)
    if p.is_dir():
        for name in ("clean_model.pth", "attack_result.pt", "defense_result.pt"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise ProbeError(f"probe 'retune' (P-ASR): {path} holds no clean_model.pth, attack_result.pt or "
                             "defense_result.pt for the clean control")
    data = safe_torch_load(p, trust=trust)
    state = data.get("model") if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping) else data
    if not isinstance(state, Mapping):
        raise ProbeError(f"probe 'retune' (P-ASR): {p} is not a state dict (nor a dict with a 'model' state dict)")
    return normalize_state_dict(state)


def clean_control(record, settings: ProbeSettings, device: torch.device, trust: bool = False,
                  progress: bool | None = None) -> torch.nn.Module:
    """The clean control network (normalising wrapper, eval mode): ``control.model`` when given, else one trained on
    the record's clean training data with :func:`control_config`, cached by content."""
    from .checkpoint import load_state_dict_strict
    from .models import build_model_for_state_dict

    model = build_model_for_state_dict(record.model_name, record.num_classes, record.state_dict, record.clean_data)
    if settings.control.model is not None:
        load_state_dict_strict(model.net, _given_state(settings.control.model, trust),
                               where=f"as the clean control {settings.control.model}")
        return prepare_model(model, device).eval()
    cfg = control_config(record, settings.control, settings.seed, str(device))
    h = hashlib.sha1(json.dumps({k: v for k, v in cfg.items() if k != "device"}, sort_keys=True,
                                default=str).encode())
    hash_images(h, record.clean_train)
    h.update(f"{record.num_classes} {torch.__version__}".encode())
    path = cache_dir().parent / "clean_control" / f"{h.hexdigest()[:24]}.pt"
    if path.is_file():
        try:
            model.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state"])
            log.info("clean control served from the cache (%s)", path.name)
            return prepare_model(model, device).eval()
        except Exception as exc:
            log.warning("ignoring unreadable clean-control cache entry %s: %s", path, exc)
    from .attacks.runner import build_attack, train_victim

    attack = build_attack(cfg)
    log.info("clean control: training a clean %s on %s (%d images, %d epochs, lr %g, batch %d)", record.model_name,
             record.clean_data, len(record.clean_train), attack.config.epochs, attack.config.lr,
             attack.config.batch_size)
    trained, history = train_victim(attack, record.clean_train, record.clean_test, bb_root=record.bb_root,
                                    progress=progress)
    state = {k: v.detach().cpu() for k, v in trained.net.state_dict().items()}
    try:
        atomic_torch_save({"state": state, "config": {k: v for k, v in cfg.items() if k != "device"},
                           "record": record.name, "last": history.rows[-1] if history.rows else {}}, path)
    except OSError as exc:
        log.debug("could not cache the clean control: %s", exc)
    model.net.load_state_dict(state)
    return prepare_model(model, device).eval()


# ---------------------------------------------------------------------------------------------------------
# the probes of one run
# ---------------------------------------------------------------------------------------------------------
class Prober:
    """The probes of one record under one setting: the held-out halves, the retuning set and the clean control are
    made once; :meth:`measure` probes one model; the victim's and the control's results are cached by content."""

    def __init__(self, record, probes: Iterable[str], settings: ProbeSettings | None = None, *,
                 clean_eval: ImageSet, bd_eval: ImageSet | None, device: torch.device, batch_size: int = 512,
                 trust: bool = False, progress: bool | None = None):
        self.record = record
        self.probes = parse_probes(list(probes))
        self.settings = settings or ProbeSettings()
        self.clean_eval, self.bd_eval = clean_eval, bd_eval
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.trust = trust
        self.progress = progress
        self._halves = None
        self._retune_data = None
        self._key = None

    # -- lazily made inputs -------------------------------------------------------------------------------
    @property
    def halves(self) -> tuple[ImageSet, ImageSet, ImageSet | None]:
        if self._halves is None:
            self._halves = split_halves(self.record.clean_test, self.clean_eval, self.bd_eval)
        return self._halves

    @property
    def retune_data(self) -> ImageSet:
        if self._retune_data is None:
            self._retune_data = retune_set(self.record, self.settings.retune, self.settings.seed)
        return self._retune_data

    def _augment(self):
        from .data.transforms import TrainAugment

        return TrainAugment.for_spec(self.record.spec)

    # -- probing one model ------------------------------------------------------------------------------
    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """``asr_half``, ``acc_half``, ``asr_refresh``, ``acc_refresh`` (refresh) and ``p_asr``, ``p_acc``
        (retune) of ``model``, fractions in [0, 1]; ``model`` itself is not modified."""
        out: dict[str, float] = {}
        if "refresh" in self.probes:
            refresh, clean_m, bd_m = self.halves
            plain = evaluate(model, clean_m, bd_m, device=self.device, batch_size=self.batch_size)
            net = refreshed(model, refresh, self.settings.refresh.batch_size, self.device)
            after = evaluate(net, clean_m, bd_m, device=self.device, batch_size=self.batch_size)
            out.update(asr_half=plain.asr, acc_half=plain.acc, asr_refresh=after.asr, acc_refresh=after.acc)
        if "retune" in self.probes:
            net = retuned(model, self.retune_data, self.settings.retune, self.settings.seed, self.device,
                          self._augment(), self.progress)
            m: Metrics = evaluate(net, self.clean_eval, self.bd_eval, device=self.device, batch_size=self.batch_size)
            out.update(p_asr=m.asr, p_acc=m.acc)
        return out

    def _content_key(self) -> str:
        """What a cached result depends on besides the weights: probes, settings, evaluation and retuning data."""
        if self._key is None:
            h = hashlib.sha1(json.dumps({"probes": self.probes, "settings": self.settings.as_dict(),
                                         "torch": torch.__version__}, sort_keys=True, default=str).encode())
            for data in (self.clean_eval, self.bd_eval):
                if data is not None:
                    hash_images(h, data)
            if "refresh" in self.probes:
                hash_images(h, self.halves[0])
            if "retune" in self.probes:
                hash_images(h, self.retune_data)
            self._key = h.hexdigest()
        return self._key

    def measure_cached(self, model: torch.nn.Module, what: str) -> dict[str, float]:
        """:meth:`measure`, cached under ``$BBGIC_CACHE_DIR/probes`` by the weights and :meth:`_content_key` (for
        the victim and the control, which every cell of a matrix shares)."""
        h = hashlib.sha1(self._content_key().encode())
        hash_weights(h, model)
        path = cache_dir() / "probes" / f"{h.hexdigest()[:24]}.json"
        if path.is_file():
            try:
                return {k: float(v) for k, v in json.loads(path.read_text())["values"].items()}
            except (ValueError, TypeError, KeyError):
                pass
        values = self.measure(model)
        try:
            atomic_write_json(path, {"record": self.record.name, "what": what, "values": values,
                                     "settings": self.settings.as_dict()})
        except OSError as exc:
            log.debug("could not cache probe results: %s", exc)
        return values

    def control(self) -> dict[str, float]:
        """The clean control's P-ASR and C-Acc after the same retuning (``p_asr``, ``p_acc``); {} without retune."""
        if "retune" not in self.probes:
            return {}
        model = clean_control(self.record, self.settings, self.device, self.trust, self.progress)
        only = Prober(self.record, ["retune"], self.settings, clean_eval=self.clean_eval, bd_eval=self.bd_eval,
                      device=self.device, batch_size=self.batch_size, trust=self.trust, progress=self.progress)
        only._retune_data = self.retune_data
        return only.measure_cached(model, "clean control")

    def row(self, victim: torch.nn.Module, purified: torch.nn.Module) -> dict[str, Any]:
        """The tidy-row columns (:class:`~backdoorbench_gic.keys.Col`): the victim's (``_before``, cached), the
        purified model's (``_after``), the clean control's (``_control``), the images they were measured on, and
        the seconds spent (``probe_seconds``: victim and purified model; ``control_seconds``: the control)."""
        t0 = time.perf_counter()
        before = self.measure_cached(victim, "victim")
        after = self.measure(purified)
        t1 = time.perf_counter()
        control = self.control()
        t2 = time.perf_counter()
        row: dict[str, Any] = {Col.PROBES: ",".join(self.probes), Col.PROBE_FINGERPRINT: self.settings.fingerprint()}
        row.update({f"{k}_before": v for k, v in before.items()})
        row.update({f"{k}_after": v for k, v in after.items()})
        row.update({f"{k}_control": v for k, v in control.items()})
        if "refresh" in self.probes:
            refresh, _, bd_m = self.halves
            row[Col.REFRESH_N] = len(refresh)
            row[Col.HALF_N_BD] = 0 if bd_m is None else int((bd_m.labels != bd_m.original_labels).sum())
        if "retune" in self.probes:
            data = self.retune_data
            row[Col.RETUNE_N], row[Col.RETUNE_N_POISON] = len(data), int(data.poison.sum())
        row[Col.PROBE_SECONDS], row[Col.CONTROL_SECONDS] = t1 - t0, t2 - t1
        return row


def probe_line(row: Mapping[str, Any]) -> str | None:
    """The probes of one run for people, in percent (``bbgic defend --probes``); None when the row has none."""
    if not row.get(Col.PROBES):
        return None

    def pct(key: str) -> str:
        v = row.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.2%}"

    parts = []
    if row.get(Col.ASR_REFRESH_AFTER) is not None:
        parts.append(f"ASR-refresh {pct(Col.ASR_REFRESH_BEFORE)} -> {pct(Col.ASR_REFRESH_AFTER)} (ASR on the same "
                     f"{row.get(Col.HALF_N_BD, '?')} images {pct(Col.ASR_HALF_BEFORE)} -> {pct(Col.ASR_HALF_AFTER)})")
    if row.get(Col.P_ASR_AFTER) is not None:
        parts.append(f"P-ASR {pct(Col.P_ASR_BEFORE)} -> {pct(Col.P_ASR_AFTER)} (clean control "
                     f"{pct(Col.P_ASR_CONTROL)}; retuned on {row.get(Col.RETUNE_N)} images, "
                     f"{row.get(Col.RETUNE_N_POISON)} poisoned)")
    seconds = float(row.get(Col.PROBE_SECONDS) or 0) + float(row.get(Col.CONTROL_SECONDS) or 0)
    return "probes: " + "; ".join(parts) + f" ({seconds:.1f} s)"


# ---------------------------------------------------------------------------------------------------------
# any purified model
# ---------------------------------------------------------------------------------------------------------
def load_purified(record, path: str | Path, trust: bool = False) -> torch.nn.Module:
    """A purified network from a ``defense_result.pt`` (ours or BackdoorBench's), in the record's normalising
    wrapper, eval mode: what :class:`Prober` (or :func:`~backdoorbench_gic.evaluation.evaluate`) takes."""
    from .checkpoint import load_state_dict_strict, normalize_state_dict
    from .models import build_model_for_state_dict
    from .results import load_defense_result

    data = load_defense_result(path, trust=trust)
    state = normalize_state_dict(data["model"])
    model = build_model_for_state_dict(str(data["model_name"]), int(data["num_classes"]), state, record.clean_data)
    load_state_dict_strict(model.net, state, where=f"of {path}")
    return model.eval()


def probe_finished_cells(source_root: str | Path, bb_root: str | Path, out_root: str | Path,
                         probes: Iterable[str] | str, options: Mapping[str, Any] | None = None, *,
                         device: str | torch.device = "cpu", select=None, batch_size: int = 512, trust: bool = False,
                         progress: bool | None = None) -> dict[str, int]:
    """Probe the purified models a finished matrix stored, without running a defense again: every finished cell
    under ``source_root`` (its ``result.json`` and ``defense_result.pt``, read only; ``select(row)`` may narrow
    them) gets its row with the probes' columns (:meth:`Prober.row`, on the same evaluation images the cell was
    scored on) written to the same relative folder under ``out_root``, which :func:`~.matrix.report.write_report`
    reads like a matrix's. Resumable: a cell already probed there is skipped. Every record is checked
    (:func:`check_probes`) before anything is probed. Returns ``{"probed": n, "skipped": n}``."""
    from .analysis.cells import DEFENSE_RESULT_FILE, Victims, finished_cells
    from .evaluation import eval_sets
    from .results import TIDY_ROW_FILE, write_tidy_row

    names = parse_probes(probes)
    if not names:
        raise ProbeError("probe_finished_cells needs at least one probe (refresh and/or retune)")
    settings = ProbeSettings.from_dict(options)
    cells = [c for c in finished_cells(source_root) if select is None or select(c.row)]
    victims = Victims(bb_root)
    for name in sorted({c.attack for c in cells}):
        check_probes(victims.record(name), names, settings)
    device = torch.device(device)
    counts = {"probed": 0, "skipped": 0}
    for cell in progress_bar(cells, desc="probing cells", unit="cell", disable=progress is False):
        out = Path(out_root) / cell.row[Col.CELL_DIR]
        if (out / TIDY_ROW_FILE).is_file():
            counts["skipped"] += 1
            continue
        record = victims.record(cell.attack)
        n_clean, n_bd = int(cell.row.get("eval_n_clean", 0)), int(cell.row.get("eval_n_bd", 0))
        full = (n_clean, n_bd) == (len(record.clean_test), 0 if record.bd_test is None else len(record.bd_test))
        clean_eval, bd_eval = eval_sets(record, None if full else max(n_clean, n_bd))
        if (len(clean_eval), 0 if bd_eval is None else len(bd_eval)) != (n_clean, n_bd):
            raise ProbeError(f"cell {cell.cell_dir}: scored on {n_clean} clean and {n_bd} poisoned test images, which "
                             f"no evaluation subset of record {record.name} reproduces")
        prober = victims.derived(cell.attack, f"prober {n_clean} {n_bd}", lambda rec: Prober(
            rec, names, settings, clean_eval=clean_eval, bd_eval=bd_eval, device=device, batch_size=batch_size,
            trust=trust, progress=False))
        victim = victims.derived(cell.attack, "victim", lambda rec: rec.build_model().to(device).eval())
        purified = load_purified(record, cell.cell_dir / DEFENSE_RESULT_FILE, trust=trust).to(device)
        row = {k: v for k, v in cell.row.items() if k != Col.CELL_DIR}
        write_tidy_row(out, {**row, **prober.row(victim, purified)})
        counts["probed"] += 1
    return counts


__all__ = ["PROBES", "PROBE_TITLES", "ControlSettings", "ProbeError", "ProbeSettings", "Prober", "RefreshSettings",
           "RetuneSettings", "check_probes", "clean_control", "control_config", "load_purified", "nest_options",
           "parse_probes", "probe_finished_cells", "probe_line", "probe_request", "refreshed", "retune_set", "retuned",
           "split_halves", "victim_schedule"]
