"""The plumbing every auxiliary source shares: its error type, the build context, the candidate pool, and the
decorator that files a source in :data:`~backdoorbench_gic.registry.AUX_SOURCES` together with the options it
accepts (so a misspelt option is an error that names it, not a silent default).

A source is a function ``source(ctx, arg) -> Pool``. The pool is the full candidate set *before* sampling
(its labels are known cheaply); :func:`backdoorbench_gic.auxdata.build_aux_set` applies the sampling rule to the
labels and asks the pool for the chosen images only, so expensive work (a shift, a PNG decode) is done for
the images that are used.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..data.imageset import ImageSet
from ..registry import AUX_SOURCES

log = logging.getLogger(__name__)


class AuxDataError(ValueError):
    """An auxiliary set that cannot be built as asked; the message says what was wrong and how to fix it."""


# options every source accepts (name -> (default, what it does))
COMMON_OPTIONS: dict[str, tuple[Any, str]] = {
    "allow_short": (False, "a class with fewer images than the rule asks for contributes all it has (with a "
                           "warning) instead of raising"),
}


@dataclass
class Pool:
    """The candidates of one source: per-position labels and a way to materialise chosen positions.

    ``take(positions)`` returns an ImageSet of those positions in that order whose ``indices`` are the
    positions; ``eligible`` (bool per position) excludes candidates without renumbering the pool, so indices
    written to ``log/index.txt`` keep meaning positions in the source.
    """

    labels: np.ndarray
    take: Callable[[np.ndarray], ImageSet]
    description: str
    eligible: np.ndarray | None = None
    short_tolerance: int = 0  # a class this many images short of the rule is taken whole (already-drawn pools)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_imageset(cls, images: ImageSet, source_name: str, description: str | None = None,
                      eligible: np.ndarray | None = None, short_tolerance: int = 0) -> "Pool":
        """A pool over an in-memory set; provenance of every drawn sample is ``source_name``."""

        def take(positions: np.ndarray) -> ImageSet:
            sub = images.subset(torch.as_tensor(positions, dtype=torch.long))
            return ImageSet(sub.images, sub.original_labels, sub.original_labels, None,
                            torch.as_tensor(positions, dtype=torch.long), None, [source_name], source_name)

        return cls(images.original_labels.numpy().astype(np.int64), take, description or source_name, eligible,
                   short_tolerance)


@dataclass
class AuxContext:
    """What a source may use: the record, the run's seed and device, its options, and the victim (built
    on first request, since most sources never need it)."""

    record: Any  # AttackRecord (not imported here to keep this module light)
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    options: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = 0.05
    n_per_class: int | None = None
    victim_model: torch.nn.Module | None = None
    reserved_type: str = ""
    index_file: Any = None  # positions to take instead of sampling (BackdoorBenchER's log/index.txt)
    replacement: bool = False  # repeat images of classes that have too few
    _train_size: int | None = None

    def opt(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    @property
    def num_classes(self) -> int:
        return int(self.record.num_classes)

    @property
    def spec(self):
        return self.record.spec

    @property
    def chw(self) -> tuple[int, int, int]:
        h, w, c = self.record.img_size
        return (int(c), int(h), int(w))

    def victim(self) -> torch.nn.Module:
        if self.victim_model is None:
            log.info("building the victim of %s for source %s", self.record.name, self.reserved_type)
            self.victim_model = self.record.build_model()
        return self.victim_model.to(self.device)  # users of the victim set (and restore) its mode themselves

    def dataset_dir(self) -> Path:
        return Path(self.record.dataset_dir())

    def train_size(self) -> int:
        """|victim training set| (the ratio rule's reference), counted without decoding PNGs where possible."""
        if self._train_size is None:
            self._train_size = victim_train_size(self.record)
        return self._train_size

    def requested_per_class(self) -> int:
        """Per-class count the sampling rule will ask for; sources that synthesise their pool size it with this."""
        if "per_class" in self.options and self.options["per_class"] is not None:
            return int(self.options["per_class"])
        if self.n_per_class is not None:
            return int(self.n_per_class)
        if self.ratio is not None:
            return int(math.floor(self.ratio * self.train_size() / self.num_classes + 1e-9))
        raise AuxDataError(f"{self.reserved_type!r} synthesises its images: say how many with ratio, n_per_class or "
                           "the option per_class")


def victim_train_size(record) -> int:
    from ..data.datasets import SplitDataset, image_folder_samples

    ds = record.dataset()
    if isinstance(ds, SplitDataset):
        try:
            return len(image_folder_samples(ds.locate() / "train")[1])
        except FileNotFoundError:
            pass
    return len(record.clean_train)


def aux_source(name: str, *, options: dict[str, tuple[Any, str]] | None = None, arg: str = "none",
               arg_help: str = "", aliases: tuple[str, ...] = (), usage: str | None = None,
               suffix: str | None = None, check: Callable[[AuxContext, str | None], None] | None = None,
               whole_set: bool = False, accepted: Callable[[str | None], dict[str, tuple[Any, str]]] | None = None,
               builtins: dict[str, str] | None = None):
    """Register ``fn(ctx, arg) -> Pool`` under ``name``; ``arg`` is "none", "optional" or "required" (the part
    after ``name:``); ``options`` maps each accepted option to (default, help).

    How a source is written and checked, declared here rather than special-cased by name:
    ``usage`` is how listings show it (default ``name``, ``name:<arg>``, ...); ``suffix`` lets ``<arg><suffix>``
    name it too (``reserved_vp`` for ``vp:reserved``); ``check(ctx, arg)`` raises :class:`AuxDataError` for a
    request that cannot work, cheaply and before any model is built (a missing folder); ``whole_set`` sources
    return the sampled :class:`ImageSet` themselves (a mix samples each part) instead of a :class:`Pool`, and
    ``accepted(arg)`` gives their options when they depend on the argument; ``builtins`` names the arguments the
    package itself provides (``external:fonts``), with a line each, for listings."""
    if arg not in ("none", "optional", "required"):
        raise ValueError(f"arg must be none, optional or required, got {arg!r}")

    def deco(fn: Callable[..., Pool]) -> Callable[..., Pool]:
        fn.aux_options = dict(options or {})  # type: ignore[attr-defined]
        fn.aux_arg = arg  # type: ignore[attr-defined]
        fn.aux_arg_help = arg_help  # type: ignore[attr-defined]
        fn.aux_usage = usage or {"none": name, "optional": f"{name}[:<arg>]", "required": f"{name}:<arg>"}[arg]
        fn.aux_suffix = suffix  # type: ignore[attr-defined]
        fn.aux_check = check  # type: ignore[attr-defined]
        fn.aux_whole_set = whole_set  # type: ignore[attr-defined]
        fn.aux_accepted = accepted  # type: ignore[attr-defined]
        fn.aux_builtins = dict(builtins or {})  # type: ignore[attr-defined]
        AUX_SOURCES.add(name, fn, aliases=aliases)
        return fn

    return deco


def source_options(fn: Callable[..., Pool]) -> dict[str, tuple[Any, str]]:
    return {**COMMON_OPTIONS, **getattr(fn, "aux_options", {})}


def check_options(options: dict[str, Any], accepted: dict[str, tuple[Any, str]], what: str) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listing = "; ".join(f"{k} (default {v[0]!r}): {v[1]}" for k, v in sorted(accepted.items()))
        raise AuxDataError(f"unknown option(s) {', '.join(map(repr, unknown))} for auxiliary type {what!r}. "
                           f"Accepted: {listing}")


def resolve_user_path(arg: str, ctx: AuxContext, what: str) -> Path:
    """A folder given by the user: as written (absolute or from the working directory), else under the
    BackdoorBench root, else under the record's dataset folder."""
    p = Path(arg).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, Path(ctx.record.bb_root) / p, ctx.dataset_dir() / p]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise AuxDataError(f"{what}: no folder {arg!r}; looked in " + ", ".join(str(c) for c in candidates)
                       + ". Give an ImageFolder tree (<class>/<image files>) by absolute path or relative to --bb_root")
