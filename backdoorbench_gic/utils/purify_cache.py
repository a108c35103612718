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
import dataclasses
import hashlib
import json
import logging
import os

import torch

from .cache import cache_dir, hash_weights
from .io import atomic_torch_save

log = logging.getLogger(__name__)

ENV = "BBGIC_PURIFY_CACHE"
# settings that change where or how fast a run goes, not what it computes
_NOT_IDENTITY = frozenset({"device", "num_workers", "pin_memory", "non_blocking", "prefetch", "frequency_save", "log",
                           "yaml_path", "result_file", "checkpoint_load", "checkpoint_save", "dataset_path"})


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def purify_key(defense, model: torch.nn.Module, aux, train_augment) -> str:
    h = hashlib.sha1()
    hash_weights(h, model)
    h.update(aux.images.contiguous().numpy().tobytes())
    h.update(aux.labels.numpy().tobytes())
    h.update(aux.indices.numpy().tobytes())
    cfg = {k: v for k, v in dataclasses.asdict(defense.config).items() if k not in _NOT_IDENTITY}
    augment = vars(train_augment) if (train_augment is not None and defense.augment) else None
    h.update(json.dumps({"defense": type(defense).__name__, "config": cfg, "augment": augment,
                         "torch": torch.__version__}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def purify(defense, model: torch.nn.Module, aux, *, device: torch.device, train_augment=None, monitor=None,
           progress: bool | None = None):
    """``defense.purify(...)``, served from the cache when enabled and present (and the defense is cacheable: a
    wrapper such as ``gic`` caches its base's purification instead of its own)."""
    if not enabled() or not getattr(defense, "cacheable", True):
        return defense.purify(model, aux, device=device, train_augment=train_augment, monitor=monitor,
                              progress=progress)
    from ..defenses.base import PurifyResult

    path = cache_dir().parent / "purified" / f"{purify_key(defense, model, aux, train_augment)}.pt"
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            net = copy.deepcopy(model).to(device)
            target = net.net if hasattr(net, "net") else net
            target.load_state_dict(data["state"])
            log.info("purified model of %s served from the cache (%s)", defense.name, path.name)
            return PurifyResult(net.eval(), [dict(r) for r in data["history"]], dict(data["extras"]))
        except Exception as exc:
            log.warning("ignoring unreadable purified-model cache entry %s: %s", path, exc)
    result = defense.purify(model, aux, device=device, train_augment=train_augment, monitor=monitor, progress=progress)
    net = result.model.net if hasattr(result.model, "net") else result.model
    scalar = (int, float, str, bool)
    try:
        atomic_torch_save({"state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                           "history": [{k: v for k, v in r.items() if isinstance(v, scalar)} for r in result.history],
                           "extras": {k: v for k, v in result.extras.items() if isinstance(v, scalar)}}, path)
    except OSError as exc:
        log.debug("could not write the purified-model cache %s: %s", path, exc)
    return result
