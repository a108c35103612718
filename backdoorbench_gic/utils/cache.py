"""Content-addressed caches (GIC fits and their summaries, purified models, victim metrics, inversions): where they
live, the one way a key is made from content (:func:`content_key`: a network's weights, image sets, settings) and
the one way an entry is read or made (:func:`load_or_compute`), so every cache keys the same content the same way
and treats a damaged entry the same way (recomputed, never trusted)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, MutableMapping, TypeVar

if TYPE_CHECKING:  # torch is imported where weights are hashed, so `bbgic list` finds the cache without it
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def cache_dir() -> Path:
    """``$BBGIC_CACHE_DIR`` (default ``~/.cache/backdoorbench_gic/gic``); other caches live in subfolders."""
    return Path(os.environ.get("BBGIC_CACHE_DIR", Path.home() / ".cache" / "backdoorbench_gic" / "gic"))


def hash_weights(h, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
    """Feed a network's weights (a module, unwrapped from its normalisation wrapper, or a state dict) to the
    hash ``h``, names sorted, bytes as stored."""
    import torch

    if isinstance(weights, torch.nn.Module):
        weights = (weights.net if hasattr(weights, "net") else weights).state_dict()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].detach().cpu().contiguous().numpy().tobytes())


def hash_images(h, data) -> None:
    """Feed an image set's whole content to the hash ``h``: every per-sample tensor (images as stored, labels,
    original labels, poison flags, dataset indices, provenance codes; each with its shape) and the provenance
    names. Two sets hash alike exactly when they hold the same samples, in the same order, with the same metadata."""
    for t in (data.images, data.labels, data.original_labels, data.poison, data.indices, data.sources):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(list(data.source_names)).encode())


def content_key(*, weights: Any = None, data: Iterable[Any] = (), settings: Any = None, length: int = 20) -> str:
    """The key of what is computed from ``weights`` (:func:`hash_weights`), the image sets ``data`` (None entries
    skipped; :func:`hash_images`) and ``settings`` (JSON, keys sorted), in that order: ``length`` hex digits."""
    h = hashlib.sha1()
    if weights is not None:
        hash_weights(h, weights)
    for d in data:
        if d is not None:
            hash_images(h, d)
    if settings is not None:
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:length]


def load_or_compute(path: Path, compute: Callable[[], T], *, load: Callable[[Path], T],
                    save: Callable[[T, Path], None], what: str, enabled: bool = True,
                    memory: MutableMapping[str, T] | None = None) -> tuple[T, bool]:
    """(the entry at ``path``, True) when ``enabled`` and it is in ``memory`` or on disk; else (``compute()``, False),
    kept in ``memory`` and written with ``save`` (which must write atomically). An unreadable entry is logged and
    recomputed, never trusted; an unwritable cache only costs the next run the work."""
    key = str(path)
    if enabled and memory is not None and key in memory:
        return memory[key], True
    if enabled and path.is_file():
        try:
            value = load(path)
        except Exception as exc:  # a damaged or foreign entry
            log.warning("ignoring unreadable %s cache entry %s: %s", what, path, exc)
        else:
            if memory is not None:
                memory[key] = value
            return value, True
    value = compute()
    if enabled:
        if memory is not None:
            memory[key] = value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save(value, path)
        except OSError as exc:
            log.debug("could not write the %s cache %s: %s", what, path, exc)
    return value, False
