"""BackdoorBenchER's held-out split: ``data/<ds>_split_<int(100*ratio)>_seed_<seed>/``.

The ``reserved`` auxiliary type needs images from the victim's distribution that the victim never saw, so the
victim must be trained on a dataset with a part held back. :func:`make_split` writes, from a dataset's train and
test splits:

- ``train/<label:05d>/<i:05d>.png``: the remainder (1 - ratio of each class);
- ``reserved/<label:05d>/<i:05d>.png``: ``floor(ratio * count_c)`` images of each class c, drawn with
  ``RandomState(seed)`` class by class;
- ``test/<label:05d>/<i:05d>.png``: the whole test set;
- ``train_idx.txt``, ``reserved_idx.txt``, ``test_idx.txt``: lines ``new_i original_idx label split``;
- ``meta.txt``: dataset, num_classes, input size, split_ratio, seed and the sizes, written last.

``i``/``new_i`` is the position in that split's list. train and reserved lists are class-major (classes
ascending, original indices ascending within a class), so a file's number equals its ImageFolder position, the
index attack records use; the test list keeps the original order, so a test file is named by its original
index (as in BackdoorBenchER's splits). If the index files exist, the split is reloaded from them instead of
drawn again. Every file is written atomically and ``meta.txt`` last, so an interrupted run never leaves a split
that looks complete, and rerunning completes it (files already there are kept).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.imageset import ImageSet
from ..data.specs import base_name, is_split_name, split_name
from ..data.transforms import nchw_to_nhwc_uint8
from ..utils.io import atomic_save_png, atomic_write_text
from .base import AuxDataError
from .layout import read_meta

log = logging.getLogger(__name__)

SPLITS = ("train", "reserved", "test")


@dataclass
class SplitIndex:
    """One split's list: original index and label per new position."""

    split: str
    original: np.ndarray
    labels: np.ndarray

    def lines(self) -> str:
        rows = enumerate(zip(self.original, self.labels))
        return "".join(f"{i} {int(o)} {int(y)} {self.split}\n" for i, (o, y) in rows)


def split_dir_name(dataset: str, split_ratio: float, seed: int) -> str:
    """BackdoorBenchER's folder name; the percentage is ``int(100 * ratio)`` exactly as theirs."""
    return split_name(dataset, int(100 * float(split_ratio)), int(seed))


def draw_split(labels: np.ndarray, num_classes: int, split_ratio: float, seed: int) -> tuple[SplitIndex, SplitIndex]:
    """(train, reserved) index lists: per class ``floor(ratio * count_c)`` reserved, seeded, class-major."""
    if not 0 < split_ratio < 1:
        raise AuxDataError(f"split_ratio must lie in (0, 1), got {split_ratio}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.RandomState(int(seed) % (2**32))
    train_o, res_o = [], []
    for c in range(num_classes):
        pos = np.flatnonzero(labels == c)
        k = int(math.floor(split_ratio * len(pos) + 1e-9))
        chosen = np.sort(rng.permutation(pos)[:k])
        res_o.append(chosen)
        train_o.append(np.setdiff1d(pos, chosen))
    tr = np.concatenate(train_o).astype(np.int64)
    rs = np.concatenate(res_o).astype(np.int64)
    if len(rs) == 0:
        raise AuxDataError(f"split_ratio {split_ratio} reserves no image (smallest class has "
                           f"{np.bincount(labels).min()}); use a larger ratio")
    return SplitIndex("train", tr, labels[tr]), SplitIndex("reserved", rs, labels[rs])


def read_split_index(path: str | os.PathLike, split: str) -> SplitIndex:
    """Parse ``new_i original_idx label split`` lines (a header or ``#`` lines are skipped)."""
    path = Path(path)
    orig, labs = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#") or not parts[0].lstrip("-").isdigit():
            continue
        if len(parts) < 3:
            raise AuxDataError(f"{path}:{lineno}: expected 'new_i original_idx label split', got {line!r}")
        if int(parts[0]) != len(orig):
            raise AuxDataError(f"{path}:{lineno}: new_i {parts[0]} out of sequence (expected {len(orig)})")
        if len(parts) >= 4 and parts[3] != split:
            raise AuxDataError(f"{path}:{lineno}: split column says {parts[3]!r}, expected {split!r}")
        orig.append(int(parts[1]))
        labs.append(int(parts[2]))
    return SplitIndex(split, np.asarray(orig, dtype=np.int64), np.asarray(labs, dtype=np.int64))


def make_split(dataset: str, split_ratio: float = 0.05, random_seed: int = 0, *,
               dataset_path: str | os.PathLike = "./data", bb_root: str | os.PathLike | None = None,
               out_dir: str | os.PathLike | None = None, progress: bool | None = None) -> Path:
    """Write (or complete, or reload) the split folder; returns its path. See the module docstring."""
    from ..data.datasets import dataset_dir_for, open_dataset
    from ..utils.logs import progress_enabled
    from ..utils.progress import progress_bar

    if is_split_name(dataset):
        raise AuxDataError(f"{dataset!r} is already a split; pass the base dataset name ({base_name(dataset)!r})")
    src = open_dataset(dataset, dataset_path, bb_root)
    name = split_dir_name(src.name, split_ratio, random_seed)
    out = Path(out_dir).resolve() if out_dir is not None else dataset_dir_for(name, dataset_path, bb_root)
    if abs(100 * split_ratio - int(100 * split_ratio)) > 1e-6:
        log.warning("split_ratio %s is not a whole percentage: the folder name %s records only %d%%", split_ratio,
                    name, int(100 * split_ratio))
    meta = read_meta(out)
    if meta:
        try:
            same = abs(float(meta.get("split_ratio", "nan")) - float(split_ratio)) < 1e-9 and \
                int(meta.get("seed", -1)) == int(random_seed)
        except ValueError:
            same = False
        if not same:
            raise AuxDataError(f"{out} was made with split_ratio {meta.get('split_ratio')} seed {meta.get('seed')}, "
                               f"not {split_ratio} / {random_seed}; delete it or choose another folder")
        if all((out / f"{s}_idx.txt").is_file() for s in SPLITS):
            log.info("%s is complete (meta.txt present)", out)
            return out
    train, test = src.train, src.test
    k = src.spec.num_classes
    idx_paths = {s: out / f"{s}_idx.txt" for s in SPLITS}
    present = {s: p.is_file() for s, p in idx_paths.items()}
    drawn_tr, drawn_rs = draw_split(train.labels.numpy(), k, split_ratio, random_seed)
    drawn = {"train": drawn_tr, "reserved": drawn_rs,
             "test": SplitIndex("test", np.arange(len(test), dtype=np.int64), test.labels.numpy().astype(np.int64))}
    lists: dict[str, SplitIndex] = {}
    if all(present.values()):
        lists = {s: read_split_index(idx_paths[s], s) for s in SPLITS}
        log.info("reloading the split from %s", ", ".join(str(p) for p in idx_paths.values()))
    else:
        for s in SPLITS:
            if present[s]:
                old = read_split_index(idx_paths[s], s)
                same = np.array_equal(old.original, drawn[s].original) and np.array_equal(old.labels, drawn[s].labels)
                if not same:
                    raise AuxDataError(f"{idx_paths[s]} exists but the other index files do not, and it disagrees with "
                                       f"the split drawn for ratio {split_ratio} seed {random_seed}; delete {out} and "
                                       "rerun")
        lists = drawn
        for s in SPLITS:  # the index files first: a resumed run then writes the same images
            if not present[s]:
                atomic_write_text(idx_paths[s], lists[s].lines())
    _check_lists(lists, train, test, k)
    for s in SPLITS:
        base: ImageSet = test if s == "test" else train
        lst = lists[s]
        width = max(5, len(str(max(len(lst.original) - 1, 0))))
        todo = [i for i in range(len(lst.original))
                if not (out / s / f"{int(lst.labels[i]):05d}" / f"{i:0{width}d}.png").is_file()]
        if not todo:
            continue
        pixels = nchw_to_nhwc_uint8(base.images[lst.original[todo]])
        bar = progress_bar(todo, desc=f"{name}/{s}", leave=False, disable=not progress_enabled(progress))
        for j, i in enumerate(bar):
            atomic_save_png(pixels[j], out / s / f"{int(lst.labels[i]):05d}" / f"{i:0{width}d}.png")
    h, w, c = src.spec.input_shape
    atomic_write_text(out / "meta.txt", "".join(f"{key}: {val}\n" for key, val in {
        "dataset": src.name, "num_classes": k, "input_size": f"{h}x{w}x{c}", "split_ratio": float(split_ratio),
        "seed": int(random_seed), "train": len(lists["train"].original), "reserved": len(lists["reserved"].original),
        "test": len(lists["test"].original), "source": str(src.locate()),
    }.items()))
    log.info("wrote %s: %d train, %d reserved, %d test", out, len(lists["train"].original),
             len(lists["reserved"].original), len(lists["test"].original))
    return out


def _check_lists(lists: dict[str, SplitIndex], train: ImageSet, test: ImageSet, k: int) -> None:
    for s, lst in lists.items():
        base = test if s == "test" else train
        if len(lst.original) and (lst.original.min() < 0 or lst.original.max() >= len(base)):
            raise AuxDataError(f"{s}_idx.txt refers to index {int(lst.original.max())} beyond the {len(base)} images "
                               "of the source dataset: it was made from other data")
        if not np.array_equal(base.labels.numpy()[lst.original], lst.labels):
            raise AuxDataError(f"{s}_idx.txt labels disagree with the source dataset: it was made from other data")
        if s != "test" and len(lst.labels) > 1 and np.any(np.diff(lst.labels) < 0):
            raise AuxDataError(f"{s}_idx.txt is not class-major: file numbers would not equal ImageFolder positions")
    if np.intersect1d(lists["train"].original, lists["reserved"].original).size:
        raise AuxDataError("train_idx.txt and reserved_idx.txt share indices: the reserved images would have been seen")
