"""With versus without GIC: pairing finished cells and the figures the GIC targets are stated in.

gic-method.md section 1 defines, for a shifted auxiliary set S and the in-distribution reference ``reserved``
(uncalibrated, same victim, base defense and size):

- DER gap closed = (DER(S+GIC) - DER(S)) / (DER(reserved) - DER(S)), only where that gap exceeds 0.02;
- C-Acc recovered = (C-Acc(S+GIC) - C-Acc(S)) / (C-Acc(reserved) - C-Acc(S)), only where that loss exceeds
  0.02 (two points).

Both are :func:`share_recovered` with :data:`GAP_THRESHOLD`; ``bbgic matrix report`` and the efficacy benchmark
compute them here and nowhere else.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .keys import Col

GAP_THRESHOLD = 0.02  # a gap (or loss) to ``reserved`` at or below this is noise: no share is computed
REFERENCE_AUX = "reserved"  # the unseen in-distribution set every shifted set is measured against
IN_DISTRIBUTION = ("train", "reserved")  # auxiliary types that are not shifted
CELL_KEYS = [Col.ATTACK, Col.BASE_DEFENSE, Col.AUX_TYPE, Col.AUX_SIZE_LABEL]  # one matrix entry, all seeds
PAIR_KEYS = CELL_KEYS + [Col.SEED]  # one calibrated and one uncalibrated run that differ in GIC alone
COMPARED = (Col.ACC_AFTER, Col.ASR_AFTER, Col.RA_AFTER, Col.DER)  # the metrics compared with and without GIC
# GIC's own measurements carried next to a pair, when the cells have them
PAIR_EXTRAS = (Col.BN_DIV_BEFORE, Col.BN_DIV_AFTER, Col.DRIFT_RATIO, Col.DRIFT_FLAG, Col.GIC_SECONDS, Col.GIC_CACHED,
               Col.GIC_STEPS, Col.BASE_SECONDS, Col.DEFENSE_SECONDS)


def share_recovered(with_gic, without_gic, reference):
    """How much of the gap ``reference - without_gic`` GIC closes: ``(with_gic - without_gic) / gap`` where the gap
    exceeds :data:`GAP_THRESHOLD`, else NaN. Scalars or arrays (elementwise); NaN inputs give NaN."""
    with_gic, without_gic, reference = (np.asarray(v, dtype=float) for v in (with_gic, without_gic, reference))
    gap = reference - without_gic
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(gap > GAP_THRESHOLD, (with_gic - without_gic) / np.where(gap > GAP_THRESHOLD, gap, 1.0),
                       np.nan)
    return float(out) if out.ndim == 0 else out


def with_base_defense(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``base_defense`` column (the defense itself where the cells carry none) and ``gic`` as bool."""
    base = df[Col.BASE_DEFENSE] if Col.BASE_DEFENSE in df else df[Col.DEFENSE]
    gic = df[Col.GIC].astype(bool) if Col.GIC in df else pd.Series(False, index=df.index)
    return df.assign(**{Col.BASE_DEFENSE: base, Col.GIC: gic})


def paired(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (attack, base defense, aux type, size, seed) holding the without- and with-GIC numbers side by
    side (``<metric>_nogic``, ``<metric>_gic``), the paired differences ``d_<metric>`` and GIC's measurements
    (:data:`PAIR_EXTRAS`). Runs without a partner are dropped."""
    cols = [*COMPARED, Col.ACC_BEFORE, Col.ASR_BEFORE]
    off = df[~df[Col.GIC]].set_index(PAIR_KEYS)[cols]
    on = df[df[Col.GIC]].set_index(PAIR_KEYS)
    extra = [c for c in PAIR_EXTRAS if c in on]
    on = on[list(COMPARED) + extra]
    both = off.merge(on, left_index=True, right_index=True, suffixes=("_nogic", "_gic")).reset_index()
    for c in COMPARED:
        both[f"d_{c}"] = both[f"{c}_gic"] - both[f"{c}_nogic"]
    return both


def reference_gaps(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per (attack, defense, aux type, size), means over the seeds of :func:`paired`'s rows, joined with the
    uncalibrated ``reserved`` C-Acc and DER of the same victim, defense and size (``acc_reserved``,
    ``der_reserved``), the losses against them (``acc_loss``, ``der_gap``) and the shares GIC recovers of them
    (``acc_recovered``, ``der_gap_closed``: :func:`share_recovered`)."""
    ref_keys = [Col.ATTACK, Col.BASE_DEFENSE, Col.AUX_SIZE_LABEL]
    ref = (pairs[pairs[Col.AUX_TYPE] == REFERENCE_AUX]
           .groupby(ref_keys)[["acc_after_nogic", "der_nogic"]].mean()
           .rename(columns={"acc_after_nogic": "acc_reserved", "der_nogic": "der_reserved"}))
    cell = (pairs.groupby(CELL_KEYS)
            [["acc_after_nogic", "acc_after_gic", "asr_after_nogic", "asr_after_gic", "der_nogic", "der_gic"]].mean())
    out = cell.join(ref, on=ref_keys).reset_index()
    out["acc_loss"] = out["acc_reserved"] - out["acc_after_nogic"]
    out["acc_recovered"] = share_recovered(out["acc_after_gic"], out["acc_after_nogic"], out["acc_reserved"])
    out["der_gap"] = out["der_reserved"] - out["der_nogic"]
    out["der_gap_closed"] = share_recovered(out["der_gic"], out["der_nogic"], out["der_reserved"])
    return out


def gic_comparison(df: pd.DataFrame) -> pd.DataFrame:
    """Per (attack, base defense, aux type, size): the means without and with GIC over all finished seeds, the
    paired difference over the seeds both sides finished (mean and standard error), the DER gap to ``reserved``
    and the share of it GIC closes. Empty unless the cells hold both sides."""
    if df.empty or Col.GIC not in df or df[Col.GIC].nunique() < 2:
        return pd.DataFrame()
    df = with_base_defense(df)
    out = []
    for key, g in df.groupby(CELL_KEYS, sort=True):
        off = g[~g[Col.GIC]].set_index(Col.SEED)
        on = g[g[Col.GIC]].set_index(Col.SEED)
        seeds = sorted(set(off.index) & set(on.index))
        row = dict(zip(CELL_KEYS, key))
        row["n_pairs"] = len(seeds)
        for col in COMPARED:
            row[f"{col}_nogic"] = float(off[col].mean()) if len(off) else math.nan
            row[f"{col}_gic"] = float(on[col].mean()) if len(on) else math.nan
            diffs = (on.loc[seeds, col] - off.loc[seeds, col]).astype(float) if seeds else pd.Series(dtype=float)
            row[f"{col}_diff"], row[f"{col}_diff_se"] = mean_se(diffs)
        out.append(row)
    comp = pd.DataFrame(out)
    ref_keys = [Col.ATTACK, Col.BASE_DEFENSE, Col.AUX_SIZE_LABEL]
    ref = comp[comp[Col.AUX_TYPE] == REFERENCE_AUX].set_index(ref_keys)["der_nogic"]
    der_reserved = np.array([ref.get(tuple(k), math.nan) for k in comp[ref_keys].itertuples(index=False)], dtype=float)
    comp["der_gap_to_reserved"] = der_reserved - comp["der_nogic"]
    comp["der_gap_closed"] = share_recovered(comp["der_gic"], comp["der_nogic"], der_reserved)
    return comp


def standard_error(x: pd.Series) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)) over the non-NaN values; NaN below two."""
    x = pd.Series(x, dtype=float).dropna()
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def mean_se(x: pd.Series) -> tuple[float, float]:
    """(mean, :func:`standard_error`) of the non-NaN values; (NaN, NaN) when there are none."""
    x = pd.Series(x, dtype=float).dropna()
    return (float(x.mean()) if len(x) else math.nan), standard_error(x)


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` (aligned by position) over the complete pairs: a pair with a
    NaN on either side is left out before ranking (ties share their mean rank). NaN when fewer than three complete
    pairs remain or either side is constant on them: too little to rank."""
    a = pd.Series(np.asarray(a, dtype=float))
    b = pd.Series(np.asarray(b, dtype=float))
    if len(a) != len(b):
        raise ValueError(f"spearman needs two series of one length, got {len(a)} and {len(b)}")
    ok = a.notna() & b.notna()
    if ok.sum() < 3 or a[ok].nunique() < 2 or b[ok].nunique() < 2:
        return math.nan
    return float(a[ok].corr(b[ok], method="spearman"))
