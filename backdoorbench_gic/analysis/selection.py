"""Which calibration variant a benchmark adopts: the selection rules of issue 16's protocols (BENCHMARKS.md, "GIC
placement and objectives") over paired efficacy frames, and the confirmation test a held-out block applies.

A *variant* is one way of running GIC (a placement, a family, an objective); its *paired frame* holds the
uncalibrated cells of a block and the variant's calibrated cells of the same victims, defenses, draws and seeds.
:func:`variant_figures` turns a paired frame into the figures every rule reads (the efficacy verdict plus the cost);
:class:`Rule` says which figures make a variant eligible; :func:`select` picks among eligible variants;
:func:`confirm` checks a selected variant's figures on a block it was never chosen on against the issue's targets.

- The first protocol (pooled over base defenses) is ``Rule()``: mean ASR rise <= 1 point, the symmetric no-harm bound.
- The per-base protocol is ``Rule(one_sided_harm=True, min_recovered=0.0, min_lossy_cells=4)`` applied to each base
  defense's cells alone (:func:`by_base`): a DER *improvement* on train or reserved is not harm, and a variant that
  recovers nothing is not calibration that pays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .efficacy import RECOVERY_TARGET, efficacy_report
from .keys import Col

COST_LIMIT = 0.25  # calibration may add this share of the base defense's wall time


def calibration_cost(df: pd.DataFrame) -> float:
    """What calibration adds to the base defense's wall time, as a share of it: the mean fit seconds (a cached fit
    keeps its fresh-fit seconds) plus the mean seconds of the placement's BatchNorm passes over the calibrated cells,
    over the mean purification seconds of the uncalibrated cells. Purifying on g(aux) is the base's own cost."""
    on, off = df[df[Col.GIC].astype(bool)], df[~df[Col.GIC].astype(bool)]
    base = off[Col.DEFENSE_SECONDS].mean() if Col.DEFENSE_SECONDS in off else math.nan
    add = 0.0
    for col in (Col.GIC_SECONDS, Col.PLACEMENT_SECONDS):
        if col in on:
            s = on[col].fillna(0.0)
            add += float(s.mean()) if len(s) else 0.0
    return float(add / base) if base and base == base else math.nan


def variant_figures(df: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """The figures of one variant's paired frame (the efficacy verdict with NaN as None, ``cost`` and ``pairs``:
    the calibrated cells) and the per-cell gaps behind them."""
    _, gaps, verdict = efficacy_report(df)
    out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in verdict.items()}
    out["cost"] = calibration_cost(df)
    out["pairs"] = int(df[Col.GIC].astype(bool).sum())
    return out, gaps


def by_base(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """A paired frame split by the base defense GIC wraps (``ft``, ``sau``, ...)."""
    return {str(b): g.reset_index(drop=True) for b, g in df.groupby(Col.BASE_DEFENSE, sort=True)}


@dataclass(frozen=True)
class Rule:
    """When a variant is eligible, and how eligible variants are ranked.

    asr_rise_limit: the largest mean ASR change on the lossy cells (a fraction: 0.01 = 1 point).
    one_sided_harm: judge no harm by ``no_harm_one_sided`` (DER may not fall, C-Acc may not fall by more than half a
        point) instead of the symmetric ``no_harm`` (|dDER| <= 0.01 both ways).
    min_recovered: the mean C-Acc recovered must exceed this (``-inf``: no floor).
    min_lossy_cells: fewer lossy cells than this is too little evidence to choose on.
    tie: variants whose C-Acc recovered is within this of the best tie; the higher DER gap closed, then a variant
        that fits nothing (``calibration_free``), then the cheaper wins.
    """

    asr_rise_limit: float = 0.01
    one_sided_harm: bool = False
    min_recovered: float = -math.inf
    min_lossy_cells: int = 1
    tie: float = 0.05

    def reasons(self, fig: dict) -> list[str]:
        """Why a variant with these figures is not eligible (empty: it is)."""
        out = []
        rec, rise = fig.get("acc_recovered_mean"), fig.get("asr_rise_on_those")
        if fig.get("acc_loss_cells", 0) < self.min_lossy_cells:
            out.append(f"{fig.get('acc_loss_cells', 0)} lossy cells (< {self.min_lossy_cells})")
        if rec is None or not rec > self.min_recovered:
            out.append("C-Acc recovered " + ("n/a" if rec is None else f"{rec * 100:.0f} %")
                       + (f" (not > {self.min_recovered * 100:.0f} %)" if self.min_recovered > -math.inf else ""))
        if rise is None or not rise <= self.asr_rise_limit:
            out.append("ASR change " + ("n/a" if rise is None else f"{rise * 100:+.1f} pts")
                       + f" (> {self.asr_rise_limit * 100:+.0f})")
        harm_key = "no_harm_one_sided" if self.one_sided_harm else "no_harm"
        if not fig.get(harm_key, False):
            out.append("harm on train/reserved" + (" (one-sided)" if self.one_sided_harm else " (symmetric bound)"))
        return out

    def eligible(self, fig: dict) -> bool:
        return not self.reasons(fig)


def select(figs: dict[str, dict], rule: Rule, calibration_free: tuple[str, ...] = ()) -> str | None:
    """The variant the rule adopts among ``{name: figures}``, or None when none is eligible."""
    ok = {v: f for v, f in figs.items() if rule.eligible(f)}
    if not ok:
        return None
    best = max(f["acc_recovered_mean"] for f in ok.values())
    tied = [v for v, f in ok.items() if f["acc_recovered_mean"] >= best - rule.tie]
    gap = {v: ok[v]["der_gap_closed_mean"] for v in tied}
    return sorted(tied, key=lambda v: (-(gap[v] if gap[v] is not None else -1.0), v not in calibration_free,
                                       ok[v]["cost"] if ok[v]["cost"] == ok[v]["cost"] else math.inf, v))[0]


def confirm(fig: dict, asr_rise_limit: float = 0.01, min_lossy_cells: int = 3,
            success_margin: float | None = None) -> dict[str, str]:
    """The issue's targets on a block the variant was never chosen on: ``{target: "ok" | "MISS" | "n/a ..."}``;
    the variant is confirmed when no entry is ``MISS``. The DER gap target is ``n/a`` without a gap cell; fewer
    lossy cells than ``min_lossy_cells`` is a MISS (nothing to confirm on). ``success_margin`` (issue 23) adds the
    target that the success rate over the lossy cells' runs rises by at least that much with GIC."""
    rec, rise, closed = fig.get("acc_recovered_mean"), fig.get("asr_rise_on_those"), fig.get("der_gap_closed_mean")
    cost = fig.get("cost")
    extra = {}
    if success_margin is not None:
        on, off = fig.get("lossy_success_rate_gic"), fig.get("lossy_success_rate_nogic")
        extra[f"success rate +{success_margin * 100:.0f} pts on lossy cells"] = (
            "ok" if on is not None and off is not None and on >= off + success_margin - 1e-12 else "MISS")
    return {**extra, 
        "lossy cells": "ok" if fig.get("acc_loss_cells", 0) >= min_lossy_cells else "MISS",
        "C-Acc recovered >= 50 %": "ok" if rec is not None and rec >= RECOVERY_TARGET else "MISS",
        f"mean ASR change <= +{asr_rise_limit * 100:.0f} pt": "ok" if rise is not None and rise <= asr_rise_limit
        else "MISS",
        "DER gap closed >= 50 %": ("n/a (no gap cell)" if not fig.get("der_gap_cells") else
                                   "ok" if closed is not None and closed >= RECOVERY_TARGET else "MISS"),
        "no harm (one-sided)": "ok" if fig.get("no_harm_one_sided") else "MISS",
        "cost <= +25 %": "ok" if cost is not None and cost == cost and cost <= COST_LIMIT else "MISS",
    }


def confirmed(checks: dict[str, str]) -> bool:
    return "MISS" not in checks.values()
