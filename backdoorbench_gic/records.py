"""BackdoorBench attack records: read ``record/<attack>/attack_result.pt`` as BackdoorBench writes it, and write
ours in the same format, so our defenses run on their records and theirs on ours.

The file is one dict with exactly eight keys (formats doc section 2.1): model_name, num_classes, model (a state
dict), data_path, img_size (H, W, C), clean_data, bd_train and bd_test. The two bd_* values are index states:
``original_index_array`` (int64), ``poison_indicator`` (float64 0/1 over the *full* split), the getitem flags,
``save_folder_path`` and ``bd_data_container.data_dict`` mapping a sample index to ``{"path", "other_info":
[poisoned_label, original_label]}``. Clean images are never stored: they are rebuilt from ``data/``; the
poisoned images are PNGs whose paths are relative to the BackdoorBench root (``--bb_root``).
"""
from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .checkpoint import load_state_dict_strict, normalize_state_dict, safe_torch_load
from .data.datasets import Dataset, open_dataset
from .data.imageset import ImageSet
from .data.specs import get_spec
from .utils.io import atomic_save_png, atomic_torch_save

log = logging.getLogger(__name__)

RECORD_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
BD_STATE_KEYS = ("original_index_array", "poison_indicator", "getitem_all", "getitem_all_switch",
                 "save_folder_path", "bd_data_container")


class RecordError(ValueError):
    """An attack record that does not follow BackdoorBench's format; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------
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
    def _resolve_png(self, stored: str, state: BDState) -> Path:
        """The stored path relative to bb_root; if the record folder was renamed or moved, the same file under
        the record folder we were given."""
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

    def _load_pngs(self, state: BDState, which: str) -> dict[int, np.ndarray]:
        from PIL import Image

        h, w, c = self.img_size
        out: dict[int, np.ndarray] = {}
        missing = []
        moved = 0
        for idx, (stored, _, _) in state.entries.items():
            path = self._resolve_png(stored, state)
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
    if not isinstance(raw, Mapping):
        raise RecordError(f"{record_dir}/attack_result.pt holds a {type(raw).__name__}, not BackdoorBench's dict")
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
    return AttackRecord(
        record_dir=record_dir,
        bb_root=bb_root,
        model_name=str(raw["model_name"]),
        num_classes=int(raw["num_classes"]),
        state_dict=normalize_state_dict(raw["model"]),
        data_path=str(raw["data_path"]),
        img_size=img_size,  # type: ignore[arg-type]
        clean_data=str(raw["clean_data"]),
        bd_train_state=BDState.from_state(raw["bd_train"], "bd_train") if raw["bd_train"] is not None else None,
        bd_test_state=BDState.from_state(raw["bd_test"], "bd_test"),
        dataset_dir_override=Path(dataset_dir).resolve() if dataset_dir is not None else None,
    )


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------
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


def write_attack_record(
    bb_root: str | os.PathLike,
    record_name: str,
    *,
    model_name: str,
    num_classes: int,
    state_dict: Mapping[str, torch.Tensor],
    clean_data: str,
    img_size: tuple[int, int, int],
    bd_train: PoisonedSplit | None,
    bd_test: PoisonedSplit,
    data_path: str | None = None,
) -> Path:
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


# ---------------------------------------------------------------------------------------------------------
# inspection
# ---------------------------------------------------------------------------------------------------------
@dataclass
class InspectReport:
    valid: bool
    facts: dict[str, Any]
    problems: list[str]
    warnings: list[str]

    def render(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.facts.items()]
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines.append("VALID" if self.valid else "INVALID")
        return "\n".join(lines)


def inspect_record(result_file: str | os.PathLike, bb_root=None, *, trust: bool = False, evaluate: bool = False,
                   device: str | None = None, batch_size: int = 512, dataset_dir=None) -> InspectReport:
    """What a record holds and whether it is usable; with ``evaluate``, recompute C-Acc/ASR/RA and compare them
    with ``attack_df_summary.csv``'s ``last`` row."""
    facts: dict[str, Any] = {}
    problems: list[str] = []
    warnings: list[str] = []
    try:
        rec = load_attack_record(result_file, bb_root, trust=trust, dataset_dir=dataset_dir)
    except Exception as exc:  # the reason is the report
        return InspectReport(False, {"record": str(result_file)}, [f"{type(exc).__name__}: {exc}"], [])
    facts["record"] = str(rec.record_dir)
    facts["bb_root"] = str(rec.bb_root)
    facts["model"] = rec.model_name
    facts["num_classes"] = rec.num_classes
    facts["image size (H, W, C)"] = rec.img_size
    facts["clean data"] = f"{rec.clean_data} at {rec.dataset_dir()}"
    facts["attack target(s)"] = f"{rec.targets} ({rec.label_mode})"
    if rec.bd_train_state is not None:
        flipped = sum(1 for _, b, o in rec.bd_train_state.entries.values() if b != o)
        facts["bd_train poisoned"] = (f"{len(rec.bd_train_state.entries)} of {len(rec.bd_train_state.poison_indicator)} "
                                      f"({flipped} label-flipped)")
    else:
        facts["bd_train poisoned"] = "none stored"
    facts["bd_test poisoned"] = f"{len(rec.bd_test_state.entries)} of {len(rec.bd_test_state.poison_indicator)}"
    per_class = Counter(o for _, _, o in rec.bd_test_state.entries.values())
    if rec.target is not None and per_class.get(rec.target, 0):
        warnings.append(f"bd_test contains {per_class[rec.target]} samples of the target class")
    missing = []
    for which, state in (("bd_train", rec.bd_train_state), ("bd_test", rec.bd_test_state)):
        if state is None:
            continue
        miss = [p for p, _, _ in state.entries.values() if not rec._resolve_png(p, state).is_file()]
        if miss:
            missing.append(f"{which}: {len(miss)} missing PNGs (first: {miss[0]})")
    facts["missing PNGs"] = "; ".join(missing) if missing else 0
    problems += missing
    try:
        spec = rec.spec
        if spec.num_classes != rec.num_classes:
            problems.append(f"num_classes {rec.num_classes} but dataset {rec.clean_data} has {spec.num_classes}")
        if tuple(spec.input_shape) != tuple(rec.img_size):
            problems.append(f"img_size {rec.img_size} but dataset {rec.clean_data} is {spec.input_shape}")
    except KeyError as exc:
        problems.append(str(exc))
    try:
        model = rec.build_model()
        facts["parameters"] = sum(p.numel() for p in model.parameters())
    except Exception as exc:
        problems.append(f"model does not load: {exc}")
        model = None
    if evaluate and model is not None and not problems:
        from .evaluation import evaluate as run_eval
        from .utils.runtime import resolve_device

        try:
            m = run_eval(model, rec.clean_test, rec.bd_test, device=resolve_device(device), batch_size=batch_size)
        except Exception as exc:
            problems.append(f"evaluation failed: {type(exc).__name__}: {exc}")
        else:
            facts["evaluated"] = f"C-Acc {m.acc:.4f}  ASR {m.asr:.4f}  RA {m.ra:.4f}"
            summary = rec.attack_summary()
            if summary is None:
                warnings.append("no attack_df_summary.csv row 'last' to compare with")
            else:
                logged = {k: summary.get(k) for k in ("test_acc", "test_asr", "test_ra")}
                facts["logged (attack_df_summary.csv, last)"] = "  ".join(
                    f"{k} {v:.4f}" for k, v in logged.items() if v is not None)
                ours = {"test_acc": m.acc, "test_asr": m.asr, "test_ra": m.ra}
                # counts are integers over known denominators: agreement is exact up to float formatting
                diffs = {k: (ours[k], v) for k, v in logged.items() if v is not None and abs(ours[k] - v) > 1e-6}
                if diffs:
                    problems.append("recomputed metrics disagree with the record's attack_df_summary.csv: " + ", ".join(
                        f"{k} {a:.6f} vs logged {b:.6f}" for k, (a, b) in diffs.items())
                        + " -- a loader mismatch (wrong data on disk?) or a tampered record")
    return InspectReport(not problems, facts, problems, warnings)
