"""Defense results in BackdoorBench's layout, written atomically.

``record/<attack>/defense/<name>/[<variant>/]`` holds ``defense_result.pt`` (exactly model_name, num_classes
and a bare state dict that loads strictly into a fresh network), ``<name>_df.csv`` (one row per epoch),
``<name>_df_summary.csv`` (rows last, valid_max, exist_nan_value), ``log/<timestamp>.log``, ``log/index.txt``
(the auxiliary indices used), an empty ``checkpoint/`` folder, the two metric plots, and our own tidy
``result.json`` / ``result.csv`` row, written last: a folder with ``result.json`` is a finished run.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch

from .checkpoint import safe_torch_load
from .utils.io import atomic_torch_save, atomic_write_json, atomic_write_text, atomic_write_with

log = logging.getLogger(__name__)

DEFENSE_RESULT_KEYS = ("model_name", "num_classes", "model")
# BackdoorBench's trainers log the test losses, then these three, last (utils/trainer_cls.py); their tools and
# ours read the CSVs by these names, and the order keeps the files alike column for column
TEST_TAIL = ("test_acc", "test_asr", "test_ra")
NAN_TEXT = "nan_value"
TIDY_ROW_FILE = "result.json"


class MetricLog:
    """Per-epoch metric rows and BackdoorBench's two CSV forms of them."""

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()):
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))

    def __len__(self) -> int:
        return len(self.rows)

    def dataframe(self) -> pd.DataFrame:
        """Columns in order of first appearance, except ``test_acc, test_asr, test_ra``, which come last."""
        df = pd.DataFrame(self.rows)
        tail = [c for c in TEST_TAIL if c in df.columns]
        return df[[c for c in df.columns if c not in tail] + tail]

    def summary(self) -> pd.DataFrame:
        """Rows ``last`` (final values; read these), ``valid_max`` (column max ignoring NaN; for ASR this is the
        worst epoch, not the result) and ``exist_nan_value``."""
        df = self.dataframe().apply(pd.to_numeric, errors="coerce")
        if df.empty:
            return pd.DataFrame(index=["last", "valid_max", "exist_nan_value"])
        return pd.DataFrame([df.iloc[-1], df.max(skipna=True), df.isna().any()],
                            index=["last", "valid_max", "exist_nan_value"])

    def save(self, folder: str | os.PathLike, prefix: str) -> tuple[Path, Path]:
        folder = Path(folder)
        df_path = folder / f"{prefix}_df.csv"
        sum_path = folder / f"{prefix}_df_summary.csv"
        atomic_write_with(df_path, lambda p: self.dataframe().to_csv(p, na_rep=NAN_TEXT))
        atomic_write_with(sum_path, lambda p: self.summary().to_csv(p, na_rep=NAN_TEXT))
        return df_path, sum_path


def read_summary_last(path: str | os.PathLike) -> dict[str, float]:
    """Row ``last`` (or row 0 of a one-row summary) of a ``*_df_summary.csv`` as floats."""
    df = pd.read_csv(path, index_col=0, na_values=[NAN_TEXT])
    row = df.loc["last"] if "last" in df.index else df.iloc[0]
    out = {}
    for k, v in row.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def defense_output_dir(record_dir: str | os.PathLike, defense_name: str, variant: str | None = None) -> Path:
    """``<record>/defense/<name>/`` plus BackdoorBenchER's ``<yaml basename>/`` variant level when given."""
    out = Path(record_dir) / "defense" / defense_name
    return out / variant if variant else out


def write_defense_result(
    out_dir: str | os.PathLike,
    *,
    csv_prefix: str,
    model_name: str,
    num_classes: int,
    state_dict: Mapping[str, torch.Tensor],
    history: MetricLog | Sequence[Mapping[str, Any]],
    index: Sequence[int] | None = None,
    plots: bool = True,
) -> Path:
    """Write the BackdoorBench files of one defense run (not the tidy row; see :func:`write_tidy_row`)."""
    out = Path(out_dir)
    (out / "log").mkdir(parents=True, exist_ok=True)
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    history = history if isinstance(history, MetricLog) else MetricLog(history)
    history.save(out, csv_prefix)
    if index is not None:
        atomic_write_text(out / "log" / "index.txt", "".join(f"{int(i)}\n" for i in index))
    if plots and len(history):
        try:
            save_metric_plots(history, out, prefix="")
        except Exception as exc:  # a plot must never cost a result
            log.warning("could not draw metric plots: %s", exc)
    payload = {
        "model_name": str(model_name),
        "num_classes": int(num_classes),
        "model": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    atomic_torch_save(payload, out / "defense_result.pt")
    return out


def write_tidy_row(out_dir: str | os.PathLike, row: Mapping[str, Any]) -> Path:
    """Our one-row summary, JSON and CSV; the JSON is written last and marks the run complete."""
    out = Path(out_dir)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    atomic_write_with(out / "result.csv", lambda p: pd.DataFrame([row]).to_csv(p, index=False))
    return atomic_write_json(out / TIDY_ROW_FILE, clean)


def load_defense_result(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """Read a ``defense_result.pt`` (ours or BackdoorBench's); an empty dict means the run diverged (section 3.1)."""
    data = safe_torch_load(path, trust=trust)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path} is an empty dict: BackdoorBench writes that when training diverged (NaN losses)")
    missing = [k for k in DEFENSE_RESULT_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {', '.join(missing)}")
    return dict(data)


PRUNE_SUFFIXES = ("_orig", "_mask")


def fold_pruning(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with ``torch.nn.utils.prune``'s reparametrisation (``<w>_orig`` and ``<w>_mask``, which
    BackdoorBench's fp.py saves: it prunes the linear layer with ``prune.custom_from_mask`` and never removes the
    hook) folded back into plain ``<w> = <w>_orig * <w>_mask``; other entries unchanged."""
    out = {k: v for k, v in state.items() if not k.endswith(PRUNE_SUFFIXES)}
    for k in state:
        if k.endswith("_orig"):
            base = k[: -len("_orig")]
            mask = state.get(base + "_mask")
            if mask is None:
                raise ValueError(f"{k} has no {base}_mask beside it: not torch's pruning reparametrisation")
            out[base] = state[k] * mask.to(state[k].dtype)
        elif k.endswith("_mask") and k[: -len("_mask")] + "_orig" not in state:
            out[k] = state[k]  # a buffer merely named *_mask
    return out


def load_defense_model(path: str | os.PathLike, record: Any, trust: bool = False) -> torch.nn.Module:
    """The purified network of a ``defense_result.pt`` (ours or BackdoorBench's) in ``record``'s normalising
    wrapper, in eval mode, loaded strictly (pruning reparametrisation folded); a network of another shape than
    the record's is an error naming the mismatch."""
    from .checkpoint import load_state_dict_strict

    data = load_defense_result(path, trust=trust)
    state = fold_pruning(data["model"])
    model = record.build_model()
    load_state_dict_strict(model.net, state, where=f"of {path}")
    return model.eval()


def save_metric_plots(history: MetricLog, out_dir: str | os.PathLike, prefix: str = "") -> None:
    """``acc_like_metric_plots.png`` and ``loss_metric_plots.png`` as BackdoorBench draws them (per epoch)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    df = history.dataframe().apply(pd.to_numeric, errors="coerce")
    x = df["epoch"] if "epoch" in df else pd.Series(range(len(df)))
    groups = {
        "acc_like_metric_plots.png": [c for c in df.columns if c.endswith(("acc", "asr", "ra")) or c.startswith("test_")],
        "loss_metric_plots.png": [c for c in df.columns if "loss" in c],
    }
    for fname, cols in groups.items():
        cols = [c for c in cols if df[c].notna().any()]
        if not cols:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in cols:
            ax.plot(x, df[c], marker="o", label=c)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        fig.tight_layout()
        target = Path(out_dir) / f"{prefix}{fname}"
        atomic_write_with(target, lambda p: fig.savefig(p, format="png", dpi=80))
        plt.close(fig)
