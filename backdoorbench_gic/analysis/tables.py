"""Markdown tables and the ``mean ± SE`` cells of the reports (no tabulate/jinja2 dependency)."""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import pandas as pd


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table, cells as ``str()`` gives them, ending with a newline."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """:func:`markdown_table` without its trailing newline, for reports that join their blocks themselves."""
    return markdown_table(header, rows).rstrip("\n")


def frame_table(df: pd.DataFrame, floatfmt: Mapping[str, int]) -> str:
    """A DataFrame as :func:`md_table`, the float cells of the columns in ``floatfmt`` to that many decimals."""
    rows = [[(f"{v:.{floatfmt[c]}f}" if c in floatfmt and isinstance(v, float) else v) for c, v in r.items()]
            for r in df.to_dict("records")]
    return md_table(list(df.columns), rows)


def pm(mean: float, se: float, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    """``mean ± se``, both times ``scale`` to ``digits`` decimals (``sign``: always show the mean's sign);
    ``-`` for a NaN mean, the mean alone for a NaN ``se`` (a single value)."""
    if mean != mean:
        return "-"
    m = f"{mean * scale:+.{digits}f}" if sign else f"{mean * scale:.{digits}f}"
    return m if se != se else f"{m} ± {se * scale:.{digits}f}"


def percent(value: float | None, digits: int = 0, sign: bool = False) -> str:
    """A fraction in percent to ``digits`` decimals (``sign``: always signed); ``-`` for NaN or None (a figure the
    analysis could not compute)."""
    return "-" if value is None else pm(value, math.nan, digits=digits, sign=sign)


def victims_table(df: pd.DataFrame) -> str:
    """The victims of a run (one row per attack): C-Acc, ASR and RA before purification, in percent."""
    v = df.groupby("attack")[["acc_before", "asr_before", "ra_before"]].first()
    return md_table(["victim", "C-Acc", "ASR", "RA"],
                    [[a, f"{r.acc_before * 100:.2f}", f"{r.asr_before * 100:.2f}", f"{r.ra_before * 100:.2f}"]
                     for a, r in v.iterrows()])


def nan_dash(value: float, fmt: str) -> str:
    """``format(value, fmt)``, or ``-`` for NaN."""
    return "-" if value != value else format(value, fmt)


__all__ = ["markdown_table", "md_table", "frame_table", "pm", "percent", "victims_table", "nan_dash"]
