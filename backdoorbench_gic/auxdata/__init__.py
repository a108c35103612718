"""Auxiliary (clean) data of known quality for backdoor purification.

The paper "Revisiting the Auxiliary Data in Backdoor Purification" (Wei et al., arXiv 2502.07231) sorts the
defender's clean data into seen / unseen in-distribution / OOD by transformation / external / synthetic; this
package builds each kind for a victim, by BackdoorBenchER's names (``--reserved_type reserved_noise``), applies
its sampling rule, reads and writes its on-disk layouts, and measures how far a set is from the victim's
training distribution (:mod:`.quality`). One entry point, :func:`build_aux_set`, serves the pipeline, the GIC
wrapper and the matrix runner.

Type names (``bbgic list aux_source``): ``train``, ``reserved``, ``reserved_<shift>`` (brightness, contrast,
color_jitter, gaussian_blur, rotation, noise, jpeg, ``reserved_tv:<spec>``), ``external:<name or folder>``,
``synthetic:<folder>``, ``synthetic:inversion``, ``folder:<name or path>`` (and any other ``reserved_*`` folder
BackdoorBenchER made), ``<type>_vp``, and ``mix:<a>+<b>[@weight]+...``.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from ..data.imageset import ImageSet
from ..registry import AUX_SOURCES, UnknownNameError
from . import sources as _sources  # noqa: F401  (registers the sources)
from .base import COMMON_OPTIONS, AuxContext, AuxDataError, Pool, check_options, source_options
from .layout import (export_image_folder, export_reserved_shift, import_image_folder, read_vp_arrays, vp_dir,
                     write_vp_arrays)
from .sampling import class_histogram, read_index_file, sample_positions, write_index_file
from .split import make_split

log = logging.getLogger(__name__)

__all__ = [
    "build_aux_set", "parse_reserved_type", "known_types", "accepted_options", "options_for", "AuxDataError",
    "AuxContext", "Pool",
    "sample_positions", "read_index_file", "write_index_file", "export_image_folder", "import_image_folder",
    "export_reserved_shift", "read_vp_arrays", "write_vp_arrays", "vp_dir", "make_split",
]

_PREFIX_ONLY = ("external", "synthetic", "folder", "mix", "vp", "reserved_tv")


def known_types() -> list[str]:
    """The names a user can write, for messages: registered names plus the prefix forms."""
    out = []
    for name in AUX_SOURCES.names():
        fn = AUX_SOURCES.get(name)
        arg = getattr(fn, "aux_arg", "none")
        if name == "vp":
            out.append("<type>_vp")
        elif name == "mix":
            out.append("mix:<a>+<b>[@w]+...")
        elif arg == "required":
            out.append(f"{name}:<arg>")
        else:
            out.append(name + ("[:<arg>]" if arg == "optional" else ""))
    return out


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
    if low.endswith("_vp") and len(low) > 3:
        return "vp", text[:-3]
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
    """Option name -> (default, help) that ``reserved_type`` accepts (the union over a mix's parts)."""
    source, arg = parse_reserved_type(reserved_type)
    if source != "mix":
        return source_options(AUX_SOURCES.get(source))
    out: dict[str, tuple[Any, str]] = dict(COMMON_OPTIONS)
    for part, _ in _split_mix(arg or ""):
        out.update(accepted_options(part))
    return out


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


def _split_mix(arg: str) -> list[tuple[str, float]]:
    from .shifts import _split_top

    parts = []
    for p in _split_top(arg, "+"):
        if not p:
            raise AuxDataError(f"empty part in mix:{arg} (write mix:<a>+<b>[@weight]+...)")
        w = 1.0
        if "@" in p and not p.endswith(")"):
            p, wt = p.rsplit("@", 1)
            try:
                w = float(wt)
            except ValueError:
                raise AuxDataError(f"mix weight {wt!r} of {p!r} is not a number") from None
            if not w > 0:
                raise AuxDataError(f"mix weight of {p!r} must be > 0, got {w}")
        parts.append((p.strip(), w))
    return parts


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    shares = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    base = np.floor(shares + 1e-9).astype(int)
    rest = total - int(base.sum())
    order = np.argsort(-(shares - base), kind="stable")
    for i in order[:rest]:
        base[i] += 1
    return base.tolist()


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
    dev = torch.device(device)
    if source == "mix":
        return _build_mix(record, reserved_type, arg or "", ratio=ratio, n_per_class=n_per_class, seed=seed,
                          index_file=index_file, replacement=replacement, victim=victim, device=dev, options=options)
    fn = AUX_SOURCES.get(source)
    check_options(options, source_options(fn), reserved_type)
    ctx = AuxContext(record, int(seed), dev, options, ratio, n_per_class, victim, reserved_type)
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


def _build_mix(record, reserved_type: str, arg: str, *, ratio, n_per_class, seed, index_file, replacement, victim,
               device, options) -> ImageSet:
    if index_file is not None:
        raise AuxDataError("index files cannot select from a mix: (indices of different sources would collide); "
                           "build the parts separately")
    parts = _split_mix(arg)
    if len(parts) < 2:
        log.warning("mix:%s has one part only", arg)
    accepted: dict[str, Any] = dict(COMMON_OPTIONS)
    for p, _ in parts:
        src, _a = parse_reserved_type(p)
        if src == "mix":
            raise AuxDataError(f"mix parts cannot be mixes themselves ({p!r})")
        accepted.update(source_options(AUX_SOURCES.get(src)))
    check_options(options, accepted, reserved_type)
    weights = [w for _, w in parts]
    per_part_n = _largest_remainder(int(n_per_class), weights) if n_per_class is not None else [None] * len(parts)
    sets = []
    for i, ((p, w), n_i) in enumerate(zip(parts, per_part_n)):
        if n_per_class is not None and n_i == 0:
            continue
        src, _a = parse_reserved_type(p)
        own = {k: v for k, v in options.items() if k in source_options(AUX_SOURCES.get(src))}
        part_ratio = None if ratio is None else ratio * w / sum(weights)
        part_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        sets.append(build_aux_set(record, p, ratio=part_ratio, n_per_class=n_i, seed=part_seed, replacement=replacement,
                                  victim=victim, device=device, options=own))
    mixed = ImageSet.concat(sets, name=reserved_type)
    log.info("mix %s: %s", reserved_type, ", ".join(f"{s.name} {len(s)}" for s in sets))
    return mixed
