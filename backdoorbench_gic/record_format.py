"""BackdoorBench's attack-record format: what ``record/<attack>/attack_result.pt`` holds, its validation, and the
writer, so our defenses run on their records and theirs on ours.

The file is one dict with exactly eight keys (formats doc section 2.1): model_name, num_classes, model (a state
dict), data_path, img_size (H, W, C), clean_data, bd_train and bd_test. The two bd_* values are index states:
``original_index_array`` (int64), ``poison_indicator`` (float64 0/1 over the *full* split), the getitem flags,
``save_folder_path`` and ``bd_data_container.data_dict`` mapping a sample index to ``{"path", "other_info":
[poisoned_label, original_label]}``. Clean images are never stored: they are rebuilt from ``data/``; the
poisoned images are PNGs whose paths are relative to the BackdoorBench root (``--bb_root``).
The loaded record and its data views are :mod:`backdoorbench_gic.records`.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .utils.io import atomic_save_png, atomic_torch_save

log = logging.getLogger(__name__)

RECORD_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
BD_STATE_KEYS = ("original_index_array", "poison_indicator", "getitem_all", "getitem_all_switch",
                 "save_folder_path", "bd_data_container")


class RecordError(ValueError):
    """An attack record that does not follow BackdoorBench's format; the message says what is wrong."""


@dataclass
class BDState:
    """One bd_train / bd_test index state, validated."""

    original_index_array: np.ndarray
    poison_indicator: np.ndarray
    save_folder_path: str
    entries: dict[int, tuple[str, int, int]]  # index -> (png path as stored, poisoned label, original label)
    getitem_all: bool = True
    getitem_all_switch: bool = False

    @classmethod
    def from_state(cls, state: Any, which: str) -> "BDState":
        if not isinstance(state, Mapping):
            raise RecordError(f"{which} must be a dict (a prepro_cls_DatasetBD_v2 state), got {type(state).__name__}")
        missing = [k for k in BD_STATE_KEYS if k not in state]
        if missing:
            raise RecordError(f"{which} lacks the key(s) {', '.join(missing)}")
        container = state["bd_data_container"]
        if not isinstance(container, Mapping) or "data_dict" not in container:
            raise RecordError(f"{which}.bd_data_container must be a dict with a 'data_dict'")
        entries: dict[int, tuple[str, int, int]] = {}
        for raw_idx, value in container["data_dict"].items():
            idx = int(raw_idx)
            if isinstance(value, Mapping):
                try:
                    path = str(value["path"])
                    bd_label, orig_label = (int(v) for v in value["other_info"])
                except (KeyError, TypeError, ValueError):
                    raise RecordError(f"{which}: data_dict entry {idx} must hold 'path' and other_info "
                                      f"[poisoned_label, original_label], got {value!r}") from None
            else:
                raise RecordError(f"{which}: data_dict entry {idx} keeps an in-memory image, not a PNG path; only records "
                                  "saved with a save folder (every BackdoorBench attack) are supported")
            entries[idx] = (path, bd_label, orig_label)
        indicator = np.asarray(state["poison_indicator"], dtype=np.float64).reshape(-1)
        poisoned = set(np.flatnonzero(indicator == 1).tolist())
        if poisoned != set(entries):
            extra = sorted(set(entries) - poisoned)[:5]
            lacking = sorted(poisoned - set(entries))[:5]
            raise RecordError(f"{which}: poison_indicator and data_dict disagree (indices in data_dict but not flagged: "
                              f"{extra}; flagged but without an image: {lacking})")
        return cls(
            original_index_array=np.asarray(state["original_index_array"], dtype=np.int64).reshape(-1),
            poison_indicator=indicator,
            save_folder_path=str(state["save_folder_path"]),
            entries=entries,
            getitem_all=bool(state["getitem_all"]),
            getitem_all_switch=bool(state["getitem_all_switch"]),
        )

    @property
    def poisoned_indices(self) -> np.ndarray:
        return np.array(sorted(self.entries), dtype=np.int64)

    def to_state(self) -> dict:
        """The dict BackdoorBench's ``prepro_cls_DatasetBD_v2.set_state`` expects."""
        data_dict = {np.int64(i): {"path": p, "other_info": [int(b), int(o)]} for i, (p, b, o) in sorted(self.entries.items())}
        return {
            "original_index_array": np.asarray(self.original_index_array, dtype=np.int64),
            "poison_indicator": np.asarray(self.poison_indicator, dtype=np.float64),
            "getitem_all": bool(self.getitem_all),
            "getitem_all_switch": bool(self.getitem_all_switch),
            "save_folder_path": self.save_folder_path,
            "bd_data_container": {
                "save_folder_path": self.save_folder_path,
                "save_file_format": ".png",
                "data_dict": data_dict,
            },
        }


def check_record_dict(raw: Any, where: Path) -> dict[str, Any]:
    """Validate the dict of an ``attack_result.pt`` (at ``where``); returns its eight values, the bd_* states parsed
    into :class:`BDState` (bd_train may be None), img_size as a tuple. Raises :class:`RecordError` saying what is
    wrong."""
    if not isinstance(raw, Mapping):
        raise RecordError(f"{where}/attack_result.pt holds a {type(raw).__name__}, not BackdoorBench's dict")
    keys = list(raw.keys())
    missing = [k for k in RECORD_KEYS if k not in raw]
    if missing:
        hint = " (this looks like a defense_result.pt)" if set(keys) == {"model_name", "num_classes", "model"} else ""
        raise RecordError(f"attack_result.pt lacks the key(s) {', '.join(missing)}{hint}; it has {', '.join(map(str, keys))}")
    extra = [k for k in keys if k not in RECORD_KEYS]
    if extra:
        log.warning("attack_result.pt has extra keys %s (ignored)", extra)
    img_size = tuple(int(v) for v in raw["img_size"])
    if len(img_size) != 3:
        raise RecordError(f"img_size must be (H, W, C), got {raw['img_size']!r}")
    if not isinstance(raw["model"], Mapping):
        raise RecordError(f"'model' must be a state dict, got {type(raw['model']).__name__}")
    if raw["bd_test"] is None:
        raise RecordError("bd_test is None: the record has no poisoned test set to measure ASR on")
    return {"model_name": str(raw["model_name"]), "num_classes": int(raw["num_classes"]), "model": raw["model"],
            "data_path": str(raw["data_path"]), "img_size": img_size, "clean_data": str(raw["clean_data"]),
            "bd_train": BDState.from_state(raw["bd_train"], "bd_train") if raw["bd_train"] is not None else None,
            "bd_test": BDState.from_state(raw["bd_test"], "bd_test")}


@dataclass
class PoisonedSplit:
    """What an attack produced for one split, before it becomes a bd_* state and PNGs.

    ``original_index_array``: indices of the view (bd_train: all of train; bd_test: the poisoned subset);
    ``images``: index -> uint8 H x W x C poisoned image; ``labels``: index -> (poisoned, original) label;
    ``split_size``: length of the full underlying split (the poison indicator's length).
    """

    original_index_array: np.ndarray
    images: dict[int, np.ndarray]
    labels: dict[int, tuple[int, int]]
    split_size: int


def write_poisoned_split(split: PoisonedSplit, bb_root: Path, record_name: str, folder: str) -> BDState:
    """Write the PNGs to ``<bb_root>/record/<name>/<folder>/<orig_label>/<index>.png`` and return the state whose
    paths are relative to bb_root, exactly as BackdoorBench stores them (``./record/<name>/<folder>/...``)."""
    save_folder = f"./record/{record_name}/{folder}"
    entries: dict[int, tuple[str, int, int]] = {}
    for idx in sorted(split.images):
        bd_label, orig_label = split.labels[idx]
        rel = f"{save_folder}/{int(orig_label)}/{int(idx)}.png"
        atomic_save_png(split.images[idx], bb_root / rel)
        entries[int(idx)] = (rel, int(bd_label), int(orig_label))
    indicator = np.zeros(split.split_size, dtype=np.float64)
    indicator[np.array(sorted(entries), dtype=np.int64)] = 1.0
    return BDState(np.asarray(split.original_index_array, dtype=np.int64), indicator, save_folder, entries)


def write_attack_record(bb_root: str | os.PathLike, record_name: str, *, model_name: str, num_classes: int,
                        state_dict: Mapping[str, torch.Tensor], clean_data: str, img_size: tuple[int, int, int],
                        bd_train: PoisonedSplit | None, bd_test: PoisonedSplit, data_path: str | None = None) -> Path:
    """Write ``<bb_root>/record/<record_name>/attack_result.pt`` plus the bd PNG trees; returns the record dir.

    The dict has BackdoorBench's eight keys in its order; ``data_path`` defaults to ``./data/<clean_data>``.
    The .pt is written last and atomically, so a record with an attack_result.pt is complete.
    """
    bb_root = Path(bb_root).resolve()
    record_dir = bb_root / "record" / record_name
    record_dir.mkdir(parents=True, exist_ok=True)
    train_state = write_poisoned_split(bd_train, bb_root, record_name, "bd_train_dataset") if bd_train else None
    test_state = write_poisoned_split(bd_test, bb_root, record_name, "bd_test_dataset")
    payload = OrderedDict(
        model_name=str(model_name),
        num_classes=int(num_classes),
        model=OrderedDict((k, v.detach().cpu()) for k, v in state_dict.items()),
        data_path=data_path or f"./data/{clean_data}",
        img_size=tuple(int(v) for v in img_size),
        clean_data=str(clean_data),
        bd_train=train_state.to_state() if train_state else None,
        bd_test=test_state.to_state(),
    )
    atomic_torch_save(dict(payload), record_dir / "attack_result.pt")
    return record_dir
