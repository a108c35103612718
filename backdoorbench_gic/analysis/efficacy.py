"""The GIC efficacy analysis (``benchmarks/efficacy.py``): paired tables, the targets and their verdicts.

Targets (gic-method.md section 1 for DER and the gap; the figures come from :mod:`.compare`):

- C-Acc recovered: on shifted sets whose uncalibrated purification loses more than :data:`GAP_THRESHOLD` C-Acc
  against ``reserved``, GIC recovers >= 50 % of that loss on average, while mean ASR rises by <= 2 points;
- DER gap closed: >= 50 % on average wherever DER(reserved) - DER(S) > :data:`GAP_THRESHOLD`;
- no harm: on ``train`` and ``reserved``, |mean dDER| <= 0.01 and mean dC-Acc >= -0.5 points (``no_harm``); the
  one-sided reading (``no_harm_one_sided``: mean dDER >= -0.01, a DER improvement is not harm) is reported beside it.

Beside them, the paper's own reading (:func:`success_figures`): how many paired runs purify successfully without
and with GIC, and how many GIC gains and loses.
"""
from __future__ import annotations

import math

import pandas as pd

from .compare import CELL_KEYS, GAP_THRESHOLD, IN_DISTRIBUTION, paired, reference_gaps, standard_error
from .keys import Col
from .tables import md_table, pm

RECOVERY_TARGET = 0.5  # share of the C-Acc loss / DER gap GIC should recover on average
ASR_RISE_LIMIT = 0.02  # mean ASR rise allowed on the cells where C-Acc is recovered
HARM_DER_LIMIT = 0.01  # |mean dDER| on in-distribution sets
HARM_ACC_LIMIT = -0.005  # mean dC-Acc on in-distribution sets


def pooled_table(pairs: pd.DataFrame) -> str:
    """Per defense x aux x size, pooled over attacks and seeds: means ± SE without and with GIC, the paired
    differences and the BN divergence before and after calibration."""
    rows = []
    for (d, aux, size), g in pairs.groupby([Col.BASE_DEFENSE, Col.AUX_TYPE, Col.AUX_SIZE_LABEL], sort=False):
        def ms(col: str, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
            return pm(g[col].mean(), standard_error(g[col]), scale, digits, sign=sign)

        rows.append([d, aux, size, len(g), ms("acc_after_nogic"), ms("acc_after_gic"), ms("d_acc_after", sign=True),
                     ms("asr_after_nogic"), ms("asr_after_gic"), ms("d_asr_after", sign=True),
                     ms("der_nogic", 1, 3), ms("der_gic", 1, 3), ms("d_der", 1, 3, sign=True),
                     f"{g[Col.BN_DIV_BEFORE].mean():.3f} -> {g[Col.BN_DIV_AFTER].mean():.3f}"
                     if Col.BN_DIV_BEFORE in g else "-"])
    return ("### Without vs with GIC (mean ± standard error over attacks x seeds; d = paired difference)\n\n"
            + md_table(["defense", "aux", "size", "pairs", "C-Acc", "C-Acc +GIC", "dC-Acc", "ASR", "ASR +GIC",
                        "dASR", "DER", "DER +GIC", "dDER", "D_BN aux -> g(aux)"], rows))


def shifted_cells(gaps: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`reference_gaps` whose auxiliary set is shifted (not train or reserved)."""
    return gaps[~gaps[Col.AUX_TYPE].isin(IN_DISTRIBUTION)]


def recovery_figures(gaps: pd.DataFrame) -> dict[str, float | int]:
    """The two headline figures over the shifted cells: mean C-Acc recovered where the loss exceeds the threshold,
    mean DER gap closed where the gap does, and how many cells each averages."""
    shifted = shifted_cells(gaps)
    lossy = shifted[shifted["acc_loss"] > GAP_THRESHOLD]
    gapped = shifted[shifted["der_gap"] > GAP_THRESHOLD]
    return {"shifted_cells": int(len(shifted)),
            "acc_loss_cells": int(len(lossy)), "acc_recovered_mean": float(lossy["acc_recovered"].mean())
            if len(lossy) else math.nan,
            "der_gap_cells": int(len(gapped)), "der_gap_closed_mean": float(gapped["der_gap_closed"].mean())
            if len(gapped) else math.nan}


def success_figures(pairs: pd.DataFrame, gaps: pd.DataFrame) -> dict[str, float | int]:
    """The paper's headline reading: the share of paired runs whose purification succeeds
    (:func:`~backdoorbench_gic.evaluation.purification_success`: ASR <= 10 % and C-Acc within 5 points of the
    victim) without and with GIC, and the runs GIC turns into a success (gained) or out of one (lost); over the
    shifted sets' runs (``success_*``) and over the runs of the lossy cells only (``lossy_success_*``)."""
    from ..evaluation import purification_success

    def ok(frame: pd.DataFrame, side: str) -> pd.Series:
        return pd.Series([purification_success(b, a, r) for b, a, r in
                          zip(frame[Col.ACC_BEFORE], frame[f"acc_after_{side}"], frame[f"asr_after_{side}"])],
                         index=frame.index, dtype=bool)

    shifted = pairs[~pairs[Col.AUX_TYPE].isin(IN_DISTRIBUTION)]
    lossy_cells = shifted_cells(gaps)
    lossy_cells = lossy_cells[lossy_cells["acc_loss"] > GAP_THRESHOLD]
    out: dict[str, float | int] = {}
    for prefix, frame in (("success", shifted), ("lossy_success", shifted.merge(lossy_cells[CELL_KEYS], on=CELL_KEYS))):
        off, on = ok(frame, "nogic"), ok(frame, "gic")
        n = len(frame)
        out.update({f"{prefix}_runs": n, f"{prefix}_rate_nogic": float(off.mean()) if n else math.nan,
                    f"{prefix}_rate_gic": float(on.mean()) if n else math.nan,
                    f"{prefix}_gained": int((on & ~off).sum()), f"{prefix}_lost": int((off & ~on).sum())})
    return out


def success_table(fig: dict) -> str:
    def rate(v: float) -> str:
        return "-" if v != v else f"{v * 100:.1f} %"

    rows = [[what, fig[f"{p}_runs"], rate(fig[f"{p}_rate_nogic"]), rate(fig[f"{p}_rate_gic"]), fig[f"{p}_gained"],
             fig[f"{p}_lost"]] for what, p in (("shifted sets", "success"), ("lossy cells", "lossy_success"))]
    return ("### Purification success (ASR <= 10 % and C-Acc within 5 points of the victim), paired runs\n\n"
            + md_table(["runs of", "runs", "success without GIC", "with GIC", "gained", "lost"], rows))


def targets(pairs: pd.DataFrame, gaps: pd.DataFrame) -> tuple[str, dict]:
    """The targets table, the no-harm table per defense, and the verdict dict."""
    fig = recovery_figures(gaps)
    shifted = shifted_cells(gaps)
    lossy = shifted[shifted["acc_loss"] > GAP_THRESHOLD]
    rec, closed = fig["acc_recovered_mean"], fig["der_gap_closed_mean"]
    lossy_pairs = pairs.merge(lossy[CELL_KEYS], on=CELL_KEYS)
    asr_rise = float(lossy_pairs["d_asr_after"].mean()) if len(lossy_pairs) else math.nan
    harm = pairs[pairs[Col.AUX_TYPE].isin(IN_DISTRIBUTION)]
    harm_rows, harm_ok, harm_one_sided = [], True, True
    for (d, aux), g in harm.groupby([Col.BASE_DEFENSE, Col.AUX_TYPE]):
        ddr, dacc = g["d_der"].mean(), g["d_acc_after"].mean()
        acc_ok = dacc >= HARM_ACC_LIMIT
        ok = abs(ddr) <= HARM_DER_LIMIT and acc_ok
        harm_ok &= bool(ok)
        harm_one_sided &= bool(ddr >= -HARM_DER_LIMIT and acc_ok)
        harm_rows.append([d, aux, len(g), pm(dacc, standard_error(g["d_acc_after"]), sign=True),
                          pm(ddr, standard_error(g["d_der"]), 1, 3, sign=True), "ok" if ok else "MISS"])
    verdict = {"acc_loss_cells": fig["acc_loss_cells"], "acc_recovered_mean": rec, "asr_rise_on_those": asr_rise,
               "der_gap_cells": fig["der_gap_cells"], "der_gap_closed_mean": closed, "no_harm": harm_ok,
               "no_harm_one_sided": harm_one_sided, **success_figures(pairs, gaps)}
    t = [["C-Acc recovered on shifted sets losing > 2 pts", f"{len(lossy)} of {len(shifted)} cells",
          pm(rec, math.nan, digits=0) + " %", ">= 50 %", "ok" if rec >= RECOVERY_TARGET else "MISS"],
         ["mean ASR change on those cells", f"{len(lossy_pairs)} pairs", pm(asr_rise, math.nan, sign=True) + " pts",
          "<= +2 pts", "ok" if asr_rise <= ASR_RISE_LIMIT else "MISS"],
         ["DER gap closed where the gap > 0.02", f"{fig['der_gap_cells']} of {len(shifted)} cells",
          pm(closed, math.nan, digits=0) + " %", ">= 50 %", "ok" if closed >= RECOVERY_TARGET else "MISS"],
         ["no harm on train/reserved", f"{len(harm)} pairs", "see below", "|dDER| <= 0.01, dC-Acc >= -0.5 pts",
          "ok" if harm_ok else "MISS"]]
    for r in t:
        if r[2].split()[0] == "-":
            r[4] = "n/a (no such cell)"
    text = ("### Targets\n\n" + md_table(["target", "over", "measured", "wanted", "verdict"], t) + "\n\n"
            + "No harm, per defense (paired over attacks x seeds):\n\n"
            + md_table(["defense", "aux", "pairs", "dC-Acc (pts)", "dDER", "verdict"], harm_rows))
    return text, verdict


def gap_table(gaps: pd.DataFrame) -> str:
    """Per victim, defense and shifted set: the loss against ``reserved`` and what GIC recovers of it."""
    def share(v: float) -> str:
        return "-" if v != v else f"{v * 100:.0f} %"

    rows = [[r.attack, r.base_defense, r.aux_type, r.aux_size_label, f"{r.acc_reserved * 100:.1f}",
             f"{r.acc_after_nogic * 100:.1f}", f"{r.acc_after_gic * 100:.1f}", share(r.acc_recovered),
             f"{r.der_reserved:.3f}", f"{r.der_nogic:.3f}", f"{r.der_gic:.3f}", share(r.der_gap_closed)]
            for r in shifted_cells(gaps).itertuples()]
    return ("### Per victim: the loss against `reserved` and what GIC recovers (means over seeds)\n\n"
            + md_table(["attack", "defense", "aux", "size", "C-Acc reserved", "C-Acc S", "C-Acc S+GIC",
                        "C-Acc recovered", "DER reserved", "DER S", "DER S+GIC", "DER gap closed"], rows))


def drift_table(pairs: pd.DataFrame) -> str | None:
    if Col.DRIFT_RATIO not in pairs:
        return None
    fl = pairs.groupby(Col.AUX_TYPE)[[Col.DRIFT_RATIO, Col.DRIFT_FLAG]].mean()
    return ("### Drift monitor (label-free): predicted share of the most-grown class over its label share "
            "after calibration; flag = ratio above the warning level\n\n"
            + md_table(["aux", "mean ratio", "share flagged"],
                       [[a, f"{r[Col.DRIFT_RATIO]:.2f}", f"{r[Col.DRIFT_FLAG] * 100:.0f} %"] for a, r in fl.iterrows()]))


def cost_table(pairs: pd.DataFrame) -> str | None:
    if Col.GIC_SECONDS not in pairs or Col.BASE_SECONDS not in pairs:
        return None
    fresh = pairs[pairs.get(Col.GIC_CACHED, 0) == 0]
    cost = []
    for d, g in pairs.groupby(Col.BASE_DEFENSE):
        fresh_d = fresh[fresh[Col.BASE_DEFENSE] == d]
        fit, base = fresh_d[Col.GIC_SECONDS], g[Col.BASE_SECONDS]
        steps = fresh_d.get(Col.GIC_STEPS, pd.Series(dtype=float))
        cost.append([d, f"{fit.mean():.1f}" if len(fit) else "(cached)",
                     f"{steps.mean():.0f}" if len(steps.dropna()) else "-", f"{base.mean():.1f}",
                     f"{fit.mean() / base.mean() * 100:.0f} %" if len(fit) else "-"])
    return ("### Cost (seconds per cell; a fit is cached and reused across base defenses)\n\n"
            + md_table(["defense", "GIC fit (fresh fits)", "fit steps run (early stopping)", "base defense",
                        "fit / base"], cost))


def efficacy_report(df: pd.DataFrame) -> tuple[str, pd.DataFrame, dict]:
    """From finished cells (``collect_results``, both sides): the report's Markdown body, the per-cell gap frame
    (:func:`reference_gaps`, written as the benchmark's CSV) and the verdict."""
    pairs = paired(df)
    gaps = reference_gaps(pairs)
    target_text, verdict = targets(pairs, gaps)
    parts = [pooled_table(pairs), target_text, success_table(verdict), gap_table(gaps), drift_table(pairs),
             cost_table(pairs)]
    return "\n\n".join(p for p in parts if p is not None), gaps, verdict
