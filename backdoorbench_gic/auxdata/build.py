"""From a type name to the sampled auxiliary set: parsing ``--reserved_type``, the options a type accepts, a
check that fails fast before any model is built, and :func:`build_aux_set`.

Every source declares how it is written and checked through :func:`~.base.aux_source` (usage, a name suffix
such as ``_vp``, a cheap ``check``, sources such as ``mix:`` that sample the whole set themselves); nothing here
special-cases a source by its name.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..data.imageset import ImageSet
from ..registry import AUX_SOURCES, UnknownNameError
from . import sources as _sources  # noqa: F401  (registers the sources)
from .base import AuxContext, AuxDataError, Pool, check_options, source_options
from .sampling import class_histogram, read_index_file, sample_positions

log = logging.getLogger(__name__)


def known_types() -> list[str]:
    """The names a user can write, for messages: each registered source as it is written."""
    return [AUX_SOURCES.get(name).aux_usage for name in AUX_SOURCES.names()]


def _suffix_form(low: str) -> tuple[str, str] | None:
    for name in AUX_SOURCES.names():
        suffix = getattr(AUX_SOURCES.get(name), "aux_suffix", None)
        if suffix and low.endswith(suffix) and len(low) > len(suffix):
            return name, suffix
    return None


def parse_reserved_type(name: str) -> tuple[str, str | None]:
    """``"reserved_noise"`` -> ``("reserved_noise", None)``; ``"external:digits"`` -> ``("external", "digits")``;
    ``"reserved_vp"`` -> ``("vp", "reserved")``; ``"reserved_imagenet"`` -> ``("folder", "reserved_imagenet")``
    (BackdoorBenchER reads unknown types as folders); anything else unknown raises, listing the known types."""
    if not isinstance(name, str) or not name.strip():
        raise AuxDataError(f"reserved_type must be a non-empty string, got {name!r}; known: {', '.join(known_types())}")
    text = name.strip()
    if ":" in text:
        prefix, arg = text.split(":", 1)
        prefix = prefix.strip().lower()
        try:
            canonical = AUX_SOURCES.resolve(prefix)
        except UnknownNameError:
            raise UnknownNameError(f"unknown auxiliary type prefix {prefix!r} in {name!r}; known types: "
                                   f"{', '.join(known_types())}") from None
        mode = getattr(AUX_SOURCES.get(canonical), "aux_arg", "none")
        if mode == "none":
            raise AuxDataError(f"auxiliary type {canonical!r} takes no ':<argument>' (got {name!r})")
        if not arg.strip():
            raise AuxDataError(f"auxiliary type {canonical!r} needs an argument after ':' (got {name!r})")
        return canonical, arg.strip()
    low = text.lower()
    suffixed = _suffix_form(low)
    if suffixed is not None:
        return suffixed[0], text[:-len(suffixed[1])]
    if low in AUX_SOURCES:
        canonical = AUX_SOURCES.resolve(low)
        if getattr(AUX_SOURCES.get(canonical), "aux_arg", "none") == "required":
            raise AuxDataError(f"auxiliary type {canonical!r} needs an argument: {canonical}:<...> "
                               f"(known types: {', '.join(known_types())})")
        return canonical, None
    if low.startswith("reserved_"):
        return "folder", text
    raise UnknownNameError(f"unknown auxiliary type {name!r}. Known types: {', '.join(known_types())}")


def accepted_options(reserved_type: str) -> dict[str, tuple[Any, str]]:
    """Option name -> (default, help) that ``reserved_type`` accepts (for a mix: the union over its parts)."""
    source, arg = parse_reserved_type(reserved_type)
    fn = AUX_SOURCES.get(source)
    accepted = getattr(fn, "aux_accepted", None)
    return accepted(arg) if accepted is not None else source_options(fn)


def options_for(reserved_types, options: dict | None) -> list[dict]:
    """Split one options dict among several types (each gets the keys it accepts); a key no type accepts is an
    error. For tools that build several sets from one command line (``bbgic aux-quality``)."""
    options = dict(options or {})
    accepted = [accepted_options(t) for t in reserved_types]
    unused = sorted(set(options) - set().union(*accepted)) if accepted else sorted(options)
    if unused:
        raise AuxDataError(f"option(s) {', '.join(map(repr, unused))} are accepted by none of "
                           f"{', '.join(reserved_types)}")
    return [{k: v for k, v in options.items() if k in acc} for acc in accepted]


def check_aux_request(record, reserved_type: str, *, options: dict | None = None, n_per_class: int | None = None,
                      index_file: str | os.PathLike | None = None, ratio: float | None = None,
                      replacement: bool = False) -> None:
    """Everything about an auxiliary-set request that can be checked without building a model or decoding an
    image: the type parses, its options are accepted, the counts make sense, the index file exists, and the
    source's own check passes (a folder type's folder exists, a mix's parts do). Raises :class:`AuxDataError`
    (or :class:`UnknownNameError`) naming what is wrong; the pipeline calls it before it touches the victim."""
    if n_per_class is not None and index_file is not None:
        raise AuxDataError("give either n_per_class or index_file, not both")
    if n_per_class is not None and int(n_per_class) < 1:
        raise AuxDataError(f"n_per_class must be >= 1, got {n_per_class}")
    if index_file is not None and not os.path.isfile(index_file):
        raise AuxDataError(f"index file {index_file} does not exist")
    source, arg = parse_reserved_type(reserved_type)
    check_options(dict(options or {}), accepted_options(reserved_type), reserved_type)
    check = getattr(AUX_SOURCES.get(source), "aux_check", None)
    if check is not None:  # ratio and n_per_class let a source check that it holds what the rule will ask
        check(AuxContext(record, options=dict(options or {}), ratio=None if n_per_class else ratio,
                         n_per_class=n_per_class, reserved_type=reserved_type, index_file=index_file,
                         replacement=replacement), arg)


def build_aux_set(record, reserved_type: str = "train", *, ratio: float | None = 0.05,
                  n_per_class: int | None = None, seed: int = 0, index_file: str | os.PathLike | None = None,
                  replacement: bool = False, victim: torch.nn.Module | None = None,
                  device: torch.device | str = "cpu", options: dict | None = None) -> ImageSet:
    """The auxiliary set of type ``reserved_type`` for ``record``'s victim.

    Sampling (BackdoorBenchER's rule, :mod:`.sampling`): ``ratio`` x |victim training set| images drawn class by
    class (per class ``floor(ratio * |train| / |pool| * count_c)``) without replacement, seeded by ``seed``; or
    ``n_per_class`` per class (it takes precedence over ``ratio``; for a ``mix:`` it counts the whole set, split
    among the parts by weight); or the positions listed in ``index_file``; ``ratio=None`` with no ``n_per_class``
    takes the whole pool. ``replacement`` repeats images of classes that have too few. ``options`` are the
    source's settings (an unknown key is an error listing the accepted ones).

    Returns an ImageSet named ``reserved_type``: images uint8 (8-bit sources) or float32 (inversion, ``_vp``),
    labels = original_labels = the true labels, poison 0, ``indices`` = positions in the source pool (what
    ``log/index.txt`` records), provenance in ``sources``/``source_names``.
    """
    options = dict(options or {})
    if n_per_class is not None and index_file is not None:
        raise AuxDataError("give either n_per_class or index_file, not both")
    source, arg = parse_reserved_type(reserved_type)
    fn = AUX_SOURCES.get(source)
    check_options(options, accepted_options(reserved_type), reserved_type)
    ctx = AuxContext(record, int(seed), torch.device(device), options, ratio, n_per_class, victim, reserved_type,
                     index_file, replacement)
    if getattr(fn, "aux_whole_set", False):
        return fn(ctx, arg)
    pool: Pool = fn(ctx, arg)
    k = int(record.num_classes)
    if index_file is not None:
        positions = read_index_file(index_file, len(pool), eligible=pool.eligible)
    else:
        needs_size = ratio is not None and n_per_class is None
        positions = sample_positions(
            pool.labels, k, ratio=ratio, train_size=ctx.train_size() if needs_size else None, n_per_class=n_per_class,
            seed=seed, replacement=replacement, allow_short=bool(ctx.opt("allow_short", False)), eligible=pool.eligible,
            source=f"{reserved_type} ({pool.description}, {len(pool)} images)", short_tolerance=pool.short_tolerance)
    aux = pool.take(positions)
    aux = ImageSet(aux.images, aux.labels, aux.labels, None, torch.as_tensor(positions, dtype=torch.long), aux.sources,
                   aux.source_names, reserved_type)
    log.info("auxiliary set %s: %d images from %s; class counts %s", reserved_type, len(aux), pool.description,
             class_histogram(aux.labels.numpy(), k))
    return aux
