"""Content-addressed caches (GIC fits, inversions, victim metrics): where they live, and how a network's weights
enter a key, so every cache keys the same victim the same way."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # torch is imported where weights are hashed, so `bbgic list` finds the cache without it
    import torch


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
    """Feed an image set's content to the hash ``h``: images (as stored), labels, original labels and poison flags,
    so two sets hash alike exactly when a model sees the same pixels and is scored against the same labels."""
    for t in (data.images, data.labels, data.original_labels, data.poison):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
