"""An opt-in, content-addressed cache of purified models (``BBGIC_PURIFY_CACHE=1``).

A purification is a pure function of the victim's weights, the auxiliary set, the defense's resolved settings and
its seed (every defense draws its randomness from generators seeded by ``random_seed``), so two matrix cells that
purify the same thing may share one run: the uncalibrated cell and a GIC cell whose placement acts after
purification (``bn-after``, ``bn-reset``, ``bn-refresh``) train exactly the same model. Off by default, because
purified models take disk space (``$BBGIC_CACHE_DIR/../purified``); benchmarks turn it on. Entries are written
atomically and read with ``weights_only=True``; an unreadable entry is recomputed, never trusted.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

from ..config import identity
from ..utils.cache import cache_dir, content_key, load_or_compute
from ..utils.io import atomic_torch_save
from .base import PurifyResult

log = logging.getLogger(__name__)

ENV = "BBGIC_PURIFY_CACHE"
_SCALAR = (int, float, str, bool)


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def purify_key(defense, model: torch.nn.Module, aux, train_augment) -> str:
    """The victim's weights, the auxiliary set's content, the defense's class and the settings that change what it
    computes (every config field not marked ``not_identity``; the seed included), the augmentation it would apply
    and the torch version."""
    augment = vars(train_augment) if (train_augment is not None and defense.augment) else None
    return content_key(weights=model, data=[aux], length=24,
                       settings={"defense": type(defense).__name__, "config": identity(defense.config),
                                 "augment": augment, "torch": torch.__version__})


def purify(defense, model: torch.nn.Module, aux, *, device: torch.device, train_augment=None, monitor=None,
           progress: bool | None = None) -> PurifyResult:
    """``defense.purify(...)``, served from the cache when enabled and present (and the defense is cacheable: a
    wrapper such as ``gic`` caches its base's purification instead of its own)."""
    def run() -> PurifyResult:
        return defense.purify(model, aux, device=device, train_augment=train_augment, monitor=monitor,
                              progress=progress)

    if not enabled() or not defense.cacheable:
        return run()

    def load(path: Path) -> PurifyResult:
        data = torch.load(path, map_location="cpu", weights_only=True)
        net = copy.deepcopy(model).to(device)
        (net.net if hasattr(net, "net") else net).load_state_dict(data["state"])
        log.info("purified model of %s served from the cache (%s)", defense.name, path.name)
        return PurifyResult(net.eval(), [dict(r) for r in data["history"]], dict(data["extras"]))

    def save(result: PurifyResult, path: Path) -> None:
        net = result.model.net if hasattr(result.model, "net") else result.model
        atomic_torch_save({"state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                           "history": [{k: v for k, v in r.items() if isinstance(v, _SCALAR)} for r in result.history],
                           "extras": {k: v for k, v in result.extras.items() if isinstance(v, _SCALAR)}}, path)

    path = cache_dir().parent / "purified" / f"{purify_key(defense, model, aux, train_augment)}.pt"
    return load_or_compute(path, run, load=load, save=save, what="purified-model")[0]
