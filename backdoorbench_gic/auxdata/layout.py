"""Auxiliary sets on disk in BackdoorBenchER's layouts, so their defenses read our sets and we read theirs.

- ImageFolder sets: ``data/<ds>/<type>/<label:05d>/<i:05d>.png`` (:func:`export_image_folder`,
  :func:`import_image_folder`). Labels are zero-padded so ImageFolder's sorted class order is the numeric order.
  File ``i`` is the sample's position in the exported set, and a ``samples.csv`` beside the class folders keeps
  each sample's pool index and source, so :func:`import_image_folder` with ``order="file"`` restores the exported
  set exactly (images, labels, indices, provenance). 8-bit sets round-trip losslessly; a float set is quantised
  to 8 bits with a warning (``float_policy="quantize"``) or refused (``"error"``). ``meta.txt`` is written last:
  a folder without it is an unfinished export.
- Shifted reserved sets: ``data/<split>/reserved_<shift>/`` with the reserved folder's file names, as
  BackdoorBenchER's generate_ood.py writes them (:func:`export_reserved_shift`). ``noise_wrap`` (their wrapped
  noise) is written to ``reserved_noise/``, the folder their scripts read; the clipped ``noise`` goes there too when
  asked for, and the export's parameter file tells the two apart.
- Calibrated arrays (``<type>_vp``): ``data/<ds>/<type>_vp/<result_file>/images.npy`` (float32 N x H x W x C in
  [0,1]) and ``labels.npy`` (int64, N): :func:`read_vp_arrays` / :func:`write_vp_arrays`, the one definition the
  GIC exporter and the ``_vp`` source share.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import image_folder_samples, read_image_folder
from ..data.imageset import ImageSet
from ..data.specs import DatasetSpec
from ..data.transforms import nchw_to_nhwc_uint8, nhwc_to_nchw
from ..utils.io import atomic_save_png, atomic_write_bytes, atomic_write_text
from .base import AuxDataError

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.csv"
META_FILE = "meta.txt"
EXPORT_PARAMS_FILE = ".bbgic_export.json"


# ---------------------------------------------------------------------------------------------------------
# ImageFolder sets
# ---------------------------------------------------------------------------------------------------------
def _meta_text(items: dict[str, Any]) -> str:
    return "".join(f"{k}: {v}\n" for k, v in items.items())


def read_meta(folder: str | os.PathLike) -> dict[str, str]:
    """``key: value`` lines of a ``meta.txt`` (BackdoorBenchER writes one per generated folder)."""
    path = Path(folder) / META_FILE
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                out[k.strip()] = v.strip()
    return out


def export_image_folder(aux: ImageSet, folder: str | os.PathLike, *, float_policy: str = "quantize",
                        overwrite: bool = False, meta: dict[str, Any] | None = None) -> Path:
    """Write ``aux`` as ``<folder>/<label:05d>/<i:05d>.png`` plus ``samples.csv`` and ``meta.txt`` (last).

    ``float_policy``: ``"quantize"`` rounds float images to 8 bits (warning: not lossless), ``"error"`` refuses.
    An existing finished export is an error unless ``overwrite``; an unfinished one is completed.
    """
    folder = Path(folder)
    if float_policy not in ("quantize", "error"):
        raise ValueError(f"float_policy must be 'quantize' or 'error', got {float_policy!r}")
    if (folder / META_FILE).is_file() and not overwrite:
        raise AuxDataError(f"{folder} already holds an exported set (meta.txt exists); pass overwrite=True or choose "
                           "another folder")
    if not aux.is_uint8:
        if float_policy == "error":
            raise AuxDataError(f"{aux.name or 'the set'} holds float images; PNG export would quantise them to 8 bits. "
                               "Use write_vp_arrays for float data, or float_policy='quantize'")
        log.warning("%s: quantising float images to 8 bits for PNG export (not lossless; use write_vp_arrays to keep "
                    "float precision)", aux.name or "auxiliary set")
    if overwrite and (folder / META_FILE).is_file():
        (folder / META_FILE).unlink()
    pixels = nchw_to_nhwc_uint8(aux.images)
    width = max(5, len(str(max(len(aux) - 1, 0))))
    rows = []
    for i in range(len(aux)):
        label = int(aux.labels[i])
        rel = f"{label:05d}/{i:0{width}d}.png"
        path = folder / rel
        if overwrite or not path.is_file():
            atomic_save_png(pixels[i], path)
        rows.append((rel, label, int(aux.indices[i]), aux.source_names[int(aux.sources[i])]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "label", "index", "source"])
    writer.writerows(rows)
    atomic_write_text(folder / SAMPLES_FILE, buf.getvalue())
    c, h, w = aux.shape
    info = {"name": aux.name, "num_samples": len(aux), "input_size": f"{h}x{w}x{c}",
            "dtype": "uint8" if aux.is_uint8 else "float32 (quantised to uint8)",
            "class_counts": np.bincount(aux.labels.numpy()).tolist() if len(aux) else [],
            "sources": ",".join(aux.source_names), **(meta or {})}
    atomic_write_text(folder / META_FILE, _meta_text(info))
    return folder


def import_image_folder(folder: str | os.PathLike, spec: DatasetSpec, *, order: str = "imagefolder",
                        name: str | None = None) -> ImageSet:
    """Read an ImageFolder set at the spec's size (uint8).

    ``order="imagefolder"`` (BackdoorBenchER's indices: class folders sorted, then file names sorted);
    ``order="file"`` sorts by the numeric file name instead, which restores a set written by
    :func:`export_image_folder` in its original order. With a ``samples.csv`` the pool indices and sources are
    restored too; otherwise indices are ImageFolder positions and the source is the folder name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no ImageFolder set at {folder}")
    if order not in ("imagefolder", "file"):
        raise ValueError(f"order must be 'imagefolder' or 'file', got {order!r}")
    exported = (folder / EXPORT_PARAMS_FILE).is_file()
    if exported and not (folder / META_FILE).is_file():
        raise AuxDataError(f"{folder} is an unfinished export (no meta.txt); rerun the export to complete it")
    images, labels, classes = read_image_folder(folder, spec)
    _, samples = image_folder_samples(folder)
    rel = [p.relative_to(folder).as_posix() for p, _ in samples]
    indices = np.arange(len(rel), dtype=np.int64)
    sources = np.zeros(len(rel), dtype=np.int64)
    source_names = [name or folder.name]
    table = folder / SAMPLES_FILE
    if table.is_file():
        with open(table, newline="") as fh:
            recs = {r["file"]: r for r in csv.DictReader(fh)}
        if set(recs) == set(rel):
            source_names = []
            for i, r in enumerate(rel):
                s = recs[r]["source"]
                if s not in source_names:
                    source_names.append(s)
                sources[i] = source_names.index(s)
                indices[i] = int(recs[r]["index"])
                if int(recs[r]["label"]) != int(labels[i]):
                    raise AuxDataError(f"{folder}/{r}: samples.csv says label {recs[r]['label']}, its folder says "
                                       f"{int(labels[i])}")
        else:
            log.warning("%s: samples.csv does not list exactly the image files; ignoring it", folder)
    if order == "file":
        try:
            keys = [int(Path(r).stem) for r in rel]
        except ValueError:
            raise AuxDataError(f"{folder}: order='file' needs numeric file names (<i:05d>.png)") from None
        perm = np.argsort(np.asarray(keys), kind="stable")
        images, labels, indices, sources = images[perm], labels[perm], indices[perm], sources[perm]
    return ImageSet(nhwc_to_nchw(images), labels, None, None, indices, sources, source_names, name or folder.name)


# ---------------------------------------------------------------------------------------------------------
# shifted reserved sets, written as BackdoorBenchER's generate_ood.py does
# ---------------------------------------------------------------------------------------------------------
def export_reserved_shift(split_dir: str | os.PathLike, shift: str, *, options: dict[str, Any] | None = None,
                          arg: str | None = None, overwrite: bool = False, progress: bool | None = None) -> Path:
    """Write ``<split_dir>/reserved_<shift>/`` from ``<split_dir>/reserved/``: every reserved image shifted once
    (the same per-image parameters :func:`~backdoorbench_gic.auxdata.build_aux_set` uses on the fly), same relative
    file names, 8-bit PNGs, ``meta.txt`` last. Resumable: an unfinished export with the same parameters is
    completed; with other parameters it is an error."""
    from ..data.datasets import open_dataset
    from .shifts import ER_FOLDER, SHIFT_OPTIONS, ShiftApplier, make_shift, seed_key

    split_dir = Path(split_dir).resolve()
    opts = {k: v[0] for k, v in SHIFT_OPTIONS.items()}
    unknown = sorted(set(options or {}) - set(opts))
    if unknown:
        raise AuxDataError(f"unknown shift option(s) {unknown}; accepted: {', '.join(sorted(opts))}")
    opts.update(options or {})
    name = shift.lower()
    # noise_wrap goes where BackdoorBenchER's generate_ood.py puts that data: reserved_noise/
    folder_name = ER_FOLDER.get(name, f"reserved_{name}" if name != "tv" else "reserved_tv_" + _safe(arg or ""))
    out = split_dir / folder_name
    reserved = split_dir / "reserved"
    if not reserved.is_dir():
        raise AuxDataError(f"{split_dir} has no reserved/ folder; make the split first (bbgic split)")
    shifter = make_shift(name, opts, arg)
    params = {"shift": name, "arg": arg, "shift_seed": int(opts["shift_seed"]), "parameters": repr(shifter)}
    pfile = out / EXPORT_PARAMS_FILE
    if (out / META_FILE).is_file() and not overwrite:
        if pfile.is_file() and json.loads(pfile.read_text()) != params:
            raise AuxDataError(f"{out} was exported with other parameters ({json.loads(pfile.read_text())}); pass "
                               "overwrite=True to replace it")
        log.info("%s exists (meta.txt present); keeping it", out)
        return out
    if pfile.is_file() and not overwrite:
        old = json.loads(pfile.read_text())
        if old != params:
            raise AuxDataError(f"{out} is an unfinished export with other parameters ({old}); delete it or pass "
                               "overwrite=True")
    elif out.exists() and not overwrite and any(out.iterdir()):
        raise AuxDataError(f"{out} exists but was not written by this tool; delete it or pass overwrite=True")
    if overwrite and (out / META_FILE).is_file():
        (out / META_FILE).unlink()
    atomic_write_text(pfile, json.dumps(params, sort_keys=True))
    ds = open_dataset(split_dir.name, directory=split_dir)
    base = ds.split("reserved")
    _, samples = image_folder_samples(reserved)
    if len(samples) != len(base):
        raise AuxDataError(f"{reserved}: {len(samples)} files but {len(base)} images read")
    applier = ShiftApplier(shifter, seed_key(name, arg), int(opts["shift_seed"]), True)
    positions = np.arange(len(base))
    todo = [i for i, (p, _) in enumerate(samples)
            if overwrite or not (out / p.relative_to(reserved)).with_suffix(".png").is_file()]
    if todo:
        shifted = applier(base.images[torch.as_tensor(todo)], positions[todo], progress=progress)
        pixels = nchw_to_nhwc_uint8(shifted)
        for j, i in enumerate(todo):
            atomic_save_png(pixels[j], (out / samples[i][0].relative_to(reserved)).with_suffix(".png"))
    atomic_write_text(out / META_FILE, _meta_text({
        "source": "reserved", "ood_type": folder_name[len("reserved_"):], "num_samples": len(base),
        "shift_seed": int(opts["shift_seed"]), "parameters": repr(shifter), "written_by": "backdoorbench_gic"}))
    return out


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


# ---------------------------------------------------------------------------------------------------------
# calibrated arrays (<type>_vp)
# ---------------------------------------------------------------------------------------------------------
def vp_dir(dataset_dir: str | os.PathLike, base_type: str, result_file: str) -> Path:
    """``data/<ds>/<type>_vp/<result_file>/`` (BackdoorBenchER: ``<dataset_path>/<reserved_type>/<result_file>``)."""
    return Path(dataset_dir) / f"{base_type}_vp" / str(result_file)


def validate_vp_arrays(images: np.ndarray, labels: np.ndarray, where: str = "arrays",
                       expected_hwc: tuple[int, int, int] | None = None, num_classes: int | None = None) -> None:
    """Raise with a clear message unless images are float32 N x H x W x C (C 1 or 3) in [0,1] and labels int64 (N,)."""
    if images.dtype != np.float32:
        raise AuxDataError(f"{where}: images must be float32, got {images.dtype}")
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise AuxDataError(f"{where}: images must be N x H x W x C with C 1 or 3 (channels last), got shape "
                           f"{images.shape}" + (" (channels first? transpose to N x H x W x C)"
                                                if images.ndim == 4 and images.shape[1] in (1, 3) else ""))
    if expected_hwc is not None and tuple(images.shape[1:]) != tuple(expected_hwc):
        raise AuxDataError(f"{where}: images are {tuple(images.shape[1:])} (H, W, C) but the victim takes "
                           f"{tuple(expected_hwc)}")
    if images.size:
        if not np.isfinite(images).all():
            raise AuxDataError(f"{where}: images contain NaN or infinite values")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise AuxDataError(f"{where}: images must lie in [0,1] (pixels, not normalised), got range "
                               f"[{lo:.4g}, {hi:.4g}]")
    if labels.dtype != np.int64:
        raise AuxDataError(f"{where}: labels must be int64, got {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise AuxDataError(f"{where}: labels must have shape ({images.shape[0]},), got {labels.shape}")
    if num_classes is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise AuxDataError(f"{where}: labels must lie in 0..{num_classes - 1}, got "
                           f"{int(labels.min())}..{int(labels.max())}")


def write_vp_arrays(folder: str | os.PathLike, images: np.ndarray | torch.Tensor, labels, *,
                    num_classes: int | None = None) -> Path:
    """Write ``images.npy`` (float32 N x H x W x C in [0,1]) and ``labels.npy`` (int64) atomically.

    ``images`` is a NumPy array already N x H x W x C, or a torch tensor N x C x H x W (this project's layout,
    transposed here); float64 is cast to float32, uint8 is refused (divide by 255 yourself: a silent cast would
    hide a mistake). ``labels.npy`` is written first, so a folder with ``images.npy`` is complete.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise AuxDataError(f"image tensor must be N x C x H x W, got shape {tuple(images.shape)}")
        images = images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
    images = np.asarray(images)
    if images.dtype == np.float64:
        images = images.astype(np.float32)
    if not np.issubdtype(images.dtype, np.floating):
        raise AuxDataError(f"vp images must be float in [0,1], got {images.dtype}")
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise AuxDataError(f"vp labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64).reshape(-1)
    validate_vp_arrays(images, labels, str(folder), num_classes=num_classes)
    folder = Path(folder)
    for fname, arr in (("labels.npy", labels), ("images.npy", np.ascontiguousarray(images))):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(folder / fname, buf.getvalue())
    return folder


def read_vp_arrays(folder: str | os.PathLike, *, expected_hwc: tuple[int, int, int] | None = None,
                   num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 N x H x W x C in [0,1], labels int64) from a ``<type>_vp/<result_file>/`` folder, validated."""
    folder = Path(folder)
    paths = [folder / "images.npy", folder / "labels.npy"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"calibrated arrays missing: {', '.join(missing)}. A <type>_vp source reads "
                                "data/<ds>/<type>_vp/<result_file>/{images,labels}.npy, written by GIC for this victim")
    try:
        images = np.load(paths[0], allow_pickle=False)
        labels = np.load(paths[1], allow_pickle=False)
    except ValueError as exc:
        raise AuxDataError(f"{folder}: not plain .npy arrays ({exc})") from None
    validate_vp_arrays(images, labels, str(folder), expected_hwc, num_classes)
    return images, labels


def vp_to_imageset(images: np.ndarray, labels: np.ndarray, name: str) -> ImageSet:
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), labels,
                    source_names=[name], name=name)

