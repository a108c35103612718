"""BackdoorBenchER's sampling rule for auxiliary data, and BackdoorBench's index files.

Whatever the source, the defense receives about ``ratio x |victim training set|`` images, drawn class by class:
with ``ratio_c = ratio * |train| / |pool|`` each class c contributes ``floor(ratio_c * count_c)`` images, drawn
without replacement (BackdoorBenchER's ``choose_by_class_flex``, re-implemented). ``n_per_class`` asks for a fixed
count per class instead, and an index file gives the positions outright. A pool that is too small in some class
is an error naming the class, what it has and what was asked (BackdoorBenchER crashes there); ``replacement``
tops such a class up with repeated draws and ``allow_short`` takes what is there.

Two deliberate details: the floor gets a 1e-9 tolerance, so a product that is an integer up to rounding
(``0.95 * 20 = 18.999999999999996``) is not cut one short; and the draw uses NumPy's ``RandomState(seed)``,
class by class in label order, so a seed fixes the whole selection on every platform.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..utils.io import atomic_write_text
from .base import AuxDataError

log = logging.getLogger(__name__)

_EPS = 1e-9


def per_class_counts(labels: np.ndarray, num_classes: int, *, ratio: float | None = None,
                     train_size: int | None = None, n_per_class: int | None = None,
                     eligible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(available per class, requested per class) under the rule; ``ratio=None`` and ``n_per_class=None``
    request every eligible image."""
    labels = np.asarray(labels, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise AuxDataError(f"the pool has label {int(bad)}, outside the victim's {num_classes} classes")
    available = np.bincount(labels[mask], minlength=num_classes)[:num_classes]
    if n_per_class is not None:
        if int(n_per_class) < 1:
            raise AuxDataError(f"n_per_class must be >= 1, got {n_per_class}")
        return available, np.full(num_classes, int(n_per_class), dtype=np.int64)
    if ratio is None:
        return available, available.copy()
    if not ratio > 0:
        raise AuxDataError(f"ratio must be > 0, got {ratio}")
    if train_size is None:
        raise AuxDataError("the ratio rule needs |victim training set| (train_size)")
    pool_size = int(available.sum())
    if pool_size == 0:
        raise AuxDataError("the auxiliary pool is empty")
    ratio_c = float(ratio) * int(train_size) / pool_size
    requested = np.floor(ratio_c * available.astype(np.float64) + _EPS).astype(np.int64)
    return available, requested


def sample_positions(labels: np.ndarray, num_classes: int, *, ratio: float | None = None,
                     train_size: int | None = None, n_per_class: int | None = None, seed: int = 0,
                     replacement: bool = False, allow_short: bool = False, eligible: np.ndarray | None = None,
                     source: str = "the pool", short_tolerance: int = 0) -> np.ndarray:
    """Positions into the pool, class-balanced by the rule (module docstring), sorted ascending.

    With ``replacement``, a class with too few images contributes all of them plus repeats drawn at random
    (classes with enough images are still drawn without replacement); ``allow_short`` takes what there is.
    ``short_tolerance`` takes a class whole when it is at most that many images short: for pools that are
    themselves an earlier draw (calibrated ``_vp`` arrays), where the rule's floor can ask for one image more.
    """
    labels = np.asarray(labels, dtype=np.int64)
    available, requested = per_class_counts(labels, num_classes, ratio=ratio, train_size=train_size,
                                            n_per_class=n_per_class, eligible=eligible)
    mask = np.ones(len(labels), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    if short_tolerance and n_per_class is None:
        near = (requested > available) & (requested - available <= int(short_tolerance))
        if near.any():
            log.debug("%s: classes %s are within %d of the rule's count; taken whole", source,
                      np.flatnonzero(near).tolist(), short_tolerance)
            requested = np.where(near, available, requested)
    short = [c for c in range(num_classes) if requested[c] > available[c]]
    if short and not (replacement or allow_short):
        c = short[0]
        how = (f"ratio {ratio} x |train| {train_size} / |pool| {int(available.sum())} = per-class ratio "
               f"{ratio * train_size / max(int(available.sum()), 1):.4f}" if n_per_class is None and ratio is not None
               else f"n_per_class {n_per_class}")
        others = f" (also short: classes {', '.join(map(str, short[1:]))})" if len(short) > 1 else ""
        raise AuxDataError(
            f"{source} has {int(available[c])} image(s) of class {c} but the sampling rule asks for "
            f"{int(requested[c])} ({how}){others}. Lower ratio / n_per_class, use a larger source, or pass "
            "replacement=True (repeat images) or the option allow_short=True (take what there is)")
    rng = np.random.RandomState(int(seed) % (2**32))
    chosen: list[np.ndarray] = []
    for c in range(num_classes):
        pos = np.flatnonzero((labels == c) & mask)
        k = int(requested[c])
        if k == 0:
            continue
        if len(pos) == 0:
            raise AuxDataError(f"{source} has no image of class {c}; the sampling rule asks for {k}. "
                               "No option can make images of a missing class: choose another source")
        if k <= len(pos):
            chosen.append(rng.permutation(pos)[:k])
        elif replacement:
            extra = rng.choice(pos, size=k - len(pos), replace=True)
            log.warning("%s: class %d has %d images for %d requested; %d drawn again (replacement=True)",
                        source, c, len(pos), k, k - len(pos))
            chosen.append(np.concatenate([pos, extra]))
        else:  # allow_short
            log.warning("%s: class %d has %d images for %d requested; taking all of them (allow_short)",
                        source, c, len(pos), k)
            chosen.append(pos)
    if not chosen:
        raise AuxDataError(
            f"the sampling rule selects no image from {source} (ratio {ratio}, |train| {train_size}, per-class "
            f"availability {available.tolist()}): pass a larger ratio or an explicit n_per_class")
    missing = [c for c in range(num_classes) if requested[c] == 0 and available[c] > 0]
    if missing and n_per_class is None:
        log.warning("%s: the ratio rule selects 0 images of classes %s", source, missing)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# index files: BackdoorBench's --index input and log/index.txt output (one integer per line)
# ---------------------------------------------------------------------------------------------------------
def read_index_file(path: str | os.PathLike, pool_size: int | None = None, *,
                    eligible: np.ndarray | None = None) -> np.ndarray:
    """Indices into a pool, in file order; blank lines and ``#`` comments are skipped. Each must lie in
    ``[0, pool_size)`` (and be eligible when a mask is given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file {path} does not exist (BackdoorBench's --index: one pool index per line)")
    values: list[int] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        for tok in text.replace(",", " ").split():
            try:
                f = float(tok)
            except ValueError:
                raise AuxDataError(f"{path}:{lineno}: {tok!r} is not an index (one integer per line)") from None
            if not math.isfinite(f) or f != int(f):
                raise AuxDataError(f"{path}:{lineno}: {tok!r} is not an integer index")
            values.append(int(f))
    if not values:
        raise AuxDataError(f"index file {path} holds no indices")
    idx = np.asarray(values, dtype=np.int64)
    if pool_size is not None:
        bad = idx[(idx < 0) | (idx >= pool_size)]
        if bad.size:
            raise AuxDataError(f"index file {path}: index {int(bad[0])} is outside the pool of {pool_size} images "
                               f"({bad.size} such indices); was it written for another auxiliary source?")
    if eligible is not None:
        inel = idx[~np.asarray(eligible, dtype=bool)[idx]]
        if inel.size:
            raise AuxDataError(f"index file {path}: index {int(inel[0])} is excluded from this pool by its options "
                               f"({inel.size} such indices)")
    dup = len(idx) - len(np.unique(idx))
    if dup:
        log.warning("index file %s repeats %d indices", path, dup)
    return idx


def write_index_file(path: str | os.PathLike, indices: Iterable[int] | np.ndarray) -> Path:
    """``log/index.txt``: one integer per line, atomically."""
    arr = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices).astype(np.int64).reshape(-1)
    return atomic_write_text(path, "".join(f"{int(i)}\n" for i in arr))


def class_histogram(labels: Sequence[int] | np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes].tolist()
