"""A loaded BackdoorBench attack record and its data views: the victim's network, the clean train/test sets
rebuilt from ``data/``, and the poisoned views (``bd_train``, ``bd_test``) with the attack's PNGs in place.

The on-disk format and the writer are :mod:`backdoorbench_gic.record_format`; what a record holds and whether it is
usable (``bbgic inspect``) is :mod:`backdoorbench_gic.inspection`, which builds on this module. The format's names
(``PoisonedSplit``, ``write_attack_record``, ...) stay importable from here.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_state_dict_strict, normalize_state_dict, safe_torch_load
from .data.datasets import Dataset, open_dataset
from .data.imageset import ImageSet
from .data.specs import get_spec
from .record_format import (BD_STATE_KEYS, RECORD_KEYS, BDState, PoisonedSplit, RecordError,  # noqa: F401
                            check_record_dict, write_attack_record, write_poisoned_split)

log = logging.getLogger(__name__)


@dataclass
class AttackRecord:
    """A loaded attack record plus lazily built views over its clean and poisoned data."""

    record_dir: Path
    bb_root: Path
    model_name: str
    num_classes: int
    state_dict: "OrderedDict[str, torch.Tensor]"
    data_path: str
    img_size: tuple[int, int, int]
    clean_data: str
    bd_train_state: BDState | None
    bd_test_state: BDState
    dataset_dir_override: Path | None = None
    _views: dict = field(default_factory=dict, repr=False)

    # -- facts -----------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.record_dir.name

    @property
    def spec(self):
        return get_spec(self.clean_data)

    @property
    def targets(self) -> list[int]:
        """Poisoned labels of the label-flipped bd_test samples: one value for all-to-one attacks."""
        return sorted({b for _, b, o in self.bd_test_state.entries.values() if b != o})

    @property
    def label_mode(self) -> str:
        return "all2one" if len(self.targets) == 1 else "all2all"

    @property
    def target(self) -> int | None:
        t = self.targets
        return t[0] if len(t) == 1 else None

    def dataset_dir(self) -> Path:
        """Where the clean data lives: the stored data_path resolved against bb_root (BackdoorBench cuts an
        absolute path at its first 'data' component; we try the path as stored first, then that rule)."""
        if self.dataset_dir_override is not None:
            return self.dataset_dir_override
        p = Path(self.data_path)
        if p.is_absolute() and p.exists():
            return p
        candidate = (self.bb_root / p).resolve()
        if not candidate.exists() and "data" in self.data_path:
            cut = self.data_path[self.data_path.index("data"):]
            alt = (self.bb_root / cut).resolve()
            if alt.exists():
                return alt
        return candidate

    def dataset(self) -> Dataset:
        return open_dataset(self.clean_data, directory=self.dataset_dir())

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self, normalize: bool = True) -> torch.nn.Module:
        """A fresh network (normalising wrapper when ``normalize``) with the record's weights loaded strictly."""
        from .models import build_model_for_state_dict

        model = build_model_for_state_dict(self.model_name, self.num_classes, self.state_dict,
                                           self.clean_data if normalize else None)
        net = model.net if normalize else model
        load_state_dict_strict(net, self.state_dict, where=f"of record {self.record_dir}")
        return model.eval()

    # -- data views ----------------------------------------------------------------------------------------
    def png_path(self, stored: str, state: BDState) -> Path:
        """Where a poisoned PNG stored as ``stored`` is: relative to bb_root; if the record folder was renamed or
        moved, the same file under the record folder we were given."""
        p = Path(stored)
        direct = p if p.is_absolute() else self.bb_root / p
        if direct.is_file():
            return direct
        folder = Path(state.save_folder_path).name  # bd_train_dataset / bd_test_dataset
        parts = p.parts
        if folder in parts:
            moved = self.record_dir.joinpath(*parts[parts.index(folder):])
            if moved.is_file():
                return moved
        return direct

    def missing_pngs(self, which: str) -> list[str]:
        """The stored paths of ``which``'s (``bd_train`` / ``bd_test``) poisoned PNGs that are not on disk."""
        state = self.bd_train_state if which == "bd_train" else self.bd_test_state
        if state is None:
            return []
        return [p for p, _, _ in state.entries.values() if not self.png_path(p, state).is_file()]

    def _load_pngs(self, state: BDState, which: str) -> dict[int, np.ndarray]:
        from PIL import Image

        h, w, c = self.img_size
        out: dict[int, np.ndarray] = {}
        missing = []
        moved = 0
        for idx, (stored, _, _) in state.entries.items():
            path = self.png_path(stored, state)
            if not path.is_file():
                missing.append(stored)
                continue
            moved += int(path != (Path(stored) if Path(stored).is_absolute() else self.bb_root / stored))
            with Image.open(path) as img:
                img = img.convert("L" if c == 1 else "RGB")
                if img.size != (w, h):
                    img = img.resize((w, h), Image.BILINEAR)
                out[idx] = np.array(img, dtype=np.uint8).reshape(h, w, c)
        if missing:
            raise RecordError(
                f"{which}: {len(missing)} of {len(state.entries)} poisoned PNGs are missing (first: {missing[0]}). Paths "
                f"are relative to the BackdoorBench root; pass --bb_root <checkout> (now {self.bb_root}) and keep the "
                "record folder under record/ with its original name")
        if moved:
            log.warning("%s: %d PNGs found under %s instead of their stored paths (record folder renamed?)",
                        which, moved, self.record_dir)
        return out

    def _poisoned_view(self, base: ImageSet, state: BDState, which: str, subset: bool) -> ImageSet:
        pngs = self._load_pngs(state, which)
        images = base.images.clone()
        labels = base.labels.clone()
        poison = torch.zeros(len(base), dtype=torch.long)
        n = len(base)
        if state.poison_indicator.shape[0] != n:
            raise RecordError(f"{which}: poison_indicator has {state.poison_indicator.shape[0]} entries but the clean "
                              f"{which.split('_')[1]} split of {self.clean_data!r} has {n} images (wrong dataset?)")
        for idx, arr in pngs.items():
            _, bd_label, orig_label = state.entries[idx]
            if int(base.labels[idx]) != orig_label:
                raise RecordError(f"{which}: sample {idx} is stored with original label {orig_label} but the clean "
                                  f"dataset says {int(base.labels[idx])}: the record does not match the data on disk")
            images[idx] = torch.from_numpy(arr).permute(2, 0, 1)
            labels[idx] = bd_label
            poison[idx] = 1
        view = ImageSet(images, labels, base.labels.clone(), poison, torch.arange(n), name=f"{self.name}/{which}")
        if subset:
            view = view.subset(torch.from_numpy(state.original_index_array), name=f"{self.name}/{which}")
        return view

    @property
    def clean_train(self) -> ImageSet:
        if "clean_train" not in self._views:
            self._views["clean_train"] = self.dataset().train
        return self._views["clean_train"]

    @property
    def clean_test(self) -> ImageSet:
        if "clean_test" not in self._views:
            self._views["clean_test"] = self.dataset().test
        return self._views["clean_test"]

    @property
    def bd_train(self) -> ImageSet | None:
        """The full training set as the victim saw it: poisoned images and labels at the poisoned indices."""
        if self.bd_train_state is None:
            return None
        if "bd_train" not in self._views:
            self._views["bd_train"] = self._poisoned_view(self.clean_train, self.bd_train_state, "bd_train", subset=True)
        return self._views["bd_train"]

    @property
    def bd_test(self) -> ImageSet:
        """The poisoned test subset (non-target samples for all-to-one), labels = poisoned labels."""
        if "bd_test" not in self._views:
            self._views["bd_test"] = self._poisoned_view(self.clean_test, self.bd_test_state, "bd_test", subset=True)
        return self._views["bd_test"]

    # -- the record's own numbers ------------------------------------------------------------------------
    def attack_summary(self) -> dict[str, float] | None:
        """Row ``last`` of ``attack_df_summary.csv`` when present."""
        path = self.record_dir / "attack_df_summary.csv"
        if not path.is_file():
            return None
        import pandas as pd

        df = pd.read_csv(path, index_col=0)
        if "last" not in df.index:
            return None
        row = df.loc["last"]
        return {k: float(v) for k, v in row.items() if _is_number(v)}


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def resolve_record_dir(result_file: str | os.PathLike, bb_root: str | os.PathLike | None = None) -> Path:
    """``--result_file`` as BackdoorBench means it (a folder name under ``<bb_root>/record/``), or a path to a
    record folder or to its attack_result.pt."""
    root = Path(bb_root or ".").resolve()
    p = Path(result_file)
    if p.name == "attack_result.pt":
        p = p.parent
    for candidate in ([p] if p.is_absolute() else [root / "record" / p, root / p, Path.cwd() / p]):
        if (candidate / "attack_result.pt").is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no attack_result.pt for {str(result_file)!r}: looked in {root / 'record' / p} and {root / p}. "
        "Pass --result_file <folder under record/> with --bb_root <BackdoorBench checkout>, or a record folder path")


def load_attack_record(result_file: str | os.PathLike, bb_root: str | os.PathLike | None = None, *,
                       trust: bool = False, dataset_dir: str | os.PathLike | None = None) -> AttackRecord:
    """Load and validate a record; views over the data are built on first access."""
    record_dir = resolve_record_dir(result_file, bb_root)
    root = Path(bb_root).resolve() if bb_root is not None else _infer_bb_root(record_dir)
    raw = safe_torch_load(record_dir / "attack_result.pt", trust=trust)
    return record_from_dict(raw, record_dir, root, dataset_dir)


def _infer_bb_root(record_dir: Path) -> Path:
    """BackdoorBench cuts the record path before its 'record' component; without --bb_root we do the same."""
    parts = record_dir.parts
    if "record" in parts:
        i = len(parts) - 1 - parts[::-1].index("record")
        return Path(*parts[:i]) if i > 0 else Path("/")
    return Path.cwd().resolve()


def record_from_dict(raw: Any, record_dir: Path, bb_root: Path, dataset_dir=None) -> AttackRecord:
    """An :class:`AttackRecord` from the dict of an ``attack_result.pt`` (validated by
    :func:`~backdoorbench_gic.record_format.check_record_dict`)."""
    v = check_record_dict(raw, record_dir)
    return AttackRecord(
        record_dir=record_dir,
        bb_root=bb_root,
        model_name=v["model_name"],
        num_classes=v["num_classes"],
        state_dict=normalize_state_dict(v["model"]),
        data_path=v["data_path"],
        img_size=v["img_size"],
        clean_data=v["clean_data"],
        bd_train_state=v["bd_train"],
        bd_test_state=v["bd_test"],
        dataset_dir_override=Path(dataset_dir).resolve() if dataset_dir is not None else None,
    )

