"""Issue 24, part (a): which defenses hold their removal? Reads the finished cells of
``benchmarks/probes24/all_reserved.yaml`` (eleven defenses on the three MNIST small-CNN victims of issue 23, the
in-distribution ``reserved`` set at 5 %, the probes ASR-refresh and P-ASR with the clean control, seeds 0-2) and
``sau_pixel.yaml`` (SAU again at BackdoorBench's pixel budget, label ``sau-pixel``, the same folder) and
answers the issue's questions with means over seeds:

- per victim and defense: C-Acc, ASR, ASR on the refresh's half, ASR-refresh, P-ASR (mean ± standard error);
- superficial safety: a defense whose removal (ASR <= 20 %) is undone by a probe (ASR-refresh or P-ASR at least
  20 points above its ASR, and P-ASR at least 20 points above the retuned clean control where that probe is the one);
- holds its removal: ASR, ASR-refresh and P-ASR all <= 10 % (P-ASR left out where the retuned clean control
  reaches 50 %: retuning then teaches any model the trigger, as on Blended);
- PAM against FT, paired by victim and seed: the change in P-ASR and C-Acc (the issue's target: P-ASR >= 20 points
  lower with C-Acc within 2 points).

    python benchmarks/probes24_reserved.py        # after `bbgic matrix run benchmarks/probes24/all_reserved.yaml`

Outputs: benchmarks/results/probes24_all_reserved.md and .json (rows of every finished cell included).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import Col, command_line, describe_machine, md_table, mean_se, pm
from backdoorbench_gic.matrix import collect_results, load_spec

HERE = Path(__file__).resolve().parent
SPEC = HERE / "probes24" / "all_reserved.yaml"
EXTRA = (HERE / "probes24" / "sau_pixel.yaml",)  # more cells in the same folder: SAU at BackdoorBench's budget
SHOWN = {Col.ACC_AFTER: "C-Acc", Col.ASR_AFTER: "ASR", Col.ASR_HALF_AFTER: "ASR (half)",
         Col.ASR_REFRESH_AFTER: "ASR-refresh", Col.P_ASR_AFTER: "P-ASR"}
REMOVED = 0.20   # a removal to speak of: ASR at most this
UNDONE = 0.20    # a probe undoes it: at least this far above the ASR (and P-ASR this far above the control)
HELD = 0.10      # holds its removal: ASR, ASR-refresh and P-ASR all at most this
UNREADABLE = 0.5  # a clean control retuned to this P-ASR learns the trigger itself: P-ASR cannot judge a defense
PAM_TARGET, ACC_TOLERANCE = 0.20, 0.02


def per_defense(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """One row per victim and defense: the seed count, mean and SE of each shown column, the verdicts."""
    rows, table = [], []
    for (attack, defense), g in df.groupby([Col.ATTACK, Col.DEFENSE_LABEL], sort=True):
        stats = {c: mean_se(g[c]) for c in SHOWN}
        m = {c: s[0] for c, s in stats.items()}
        control = float(g[Col.P_ASR_CONTROL].mean())
        removed = m[Col.ASR_AFTER] <= REMOVED
        undone_by = [name for col, name in ((Col.ASR_REFRESH_AFTER, "refresh"), (Col.P_ASR_AFTER, "retuning"))
                     if m[col] - m[Col.ASR_HALF_AFTER if col == Col.ASR_REFRESH_AFTER else Col.ASR_AFTER] >= UNDONE
                     and (col != Col.P_ASR_AFTER or m[col] - control >= UNDONE)]
        readable = control < UNREADABLE
        held = all(m[c] <= HELD for c in (Col.ASR_AFTER, Col.ASR_REFRESH_AFTER) + ((Col.P_ASR_AFTER,) * readable))
        verdict = ("not removed" if not removed else f"superficial ({' and '.join(undone_by)})" if undone_by
                   else ("holds" if readable else "holds against refresh (retuning unreadable)") if held
                   else "partly held")
        rows.append({"attack": attack, "defense": defense, "seeds": int(len(g)), "p_asr_control": control,
                     **{c: m[c] for c in SHOWN}, **{f"{c}_se": s[1] for c, s in stats.items()}, "verdict": verdict})
        table.append([attack, defense, len(g)] + [pm(*stats[c]) for c in SHOWN] + [verdict])
    return pd.DataFrame(rows), md_table(["victim", "defense", "seeds", *SHOWN.values(), "verdict"], table)


def pam_vs_ft(df: pd.DataFrame) -> tuple[dict, str]:
    """PAM minus FT per victim, paired by seed: P-ASR, ASR and C-Acc changes (mean ± SE) and the target's verdict."""
    keys = [Col.ATTACK, Col.SEED]
    ft = df[df[Col.DEFENSE_LABEL] == "ft"].set_index(keys)
    pam = df[df[Col.DEFENSE_LABEL] == "pam"].set_index(keys)
    both = pam.merge(ft, left_index=True, right_index=True, suffixes=("_pam", "_ft"))
    out, table = {}, []
    for attack, g in both.groupby(level=Col.ATTACK):
        d = {c: mean_se(g[f"{c}_pam"] - g[f"{c}_ft"]) for c in (Col.P_ASR_AFTER, Col.ASR_AFTER, Col.ACC_AFTER)}
        met = d[Col.P_ASR_AFTER][0] <= -PAM_TARGET and abs(d[Col.ACC_AFTER][0]) <= ACC_TOLERANCE
        out[attack] = {"pairs": int(len(g)), **{f"d_{c}": v[0] for c, v in d.items()},
                       **{f"d_{c}_se": v[1] for c, v in d.items()},
                       "p_asr_ft": float(g[f"{Col.P_ASR_AFTER}_ft"].mean()),
                       "p_asr_pam": float(g[f"{Col.P_ASR_AFTER}_pam"].mean()),
                       "p_asr_control": float(g[f"{Col.P_ASR_CONTROL}_ft"].mean()), "target_met": bool(met)}
        table.append([attack, len(g), f"{out[attack]['p_asr_ft'] * 100:.1f}", f"{out[attack]['p_asr_pam'] * 100:.1f}",
                      pm(*d[Col.P_ASR_AFTER], sign=True), pm(*d[Col.ASR_AFTER], sign=True),
                      pm(*d[Col.ACC_AFTER], sign=True), f"{out[attack]['p_asr_control'] * 100:.1f}",
                      "met" if met else "missed"])
    return out, md_table(["victim", "pairs", "FT P-ASR", "PAM P-ASR", "dP-ASR", "dASR", "dC-Acc", "control P-ASR",
                          "target (-20, C-Acc within 2)"], table)


def victims(df: pd.DataFrame) -> str:
    g = df.groupby(Col.ATTACK)
    rows = [[a, f"{r[Col.ACC_BEFORE] * 100:.1f}", f"{r[Col.ASR_BEFORE] * 100:.1f}",
             f"{r[Col.ASR_REFRESH_BEFORE] * 100:.1f}", f"{r[Col.P_ASR_BEFORE] * 100:.1f}",
             f"{r[Col.P_ASR_CONTROL] * 100:.1f}"] for a, r in g.mean(numeric_only=True).iterrows()]
    return md_table(["victim", "C-Acc", "ASR", "ASR-refresh", "P-ASR", "clean control P-ASR"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    from backdoorbench_gic.utils.io import atomic_write_text

    spec = load_spec(SPEC)
    df = collect_results(spec.output_root)
    if df.empty:
        raise SystemExit(f"no finished cells under {spec.output_root}: run `bbgic matrix run {SPEC}` first")
    cells_in_spec = len(spec.cells()) + sum(len(load_spec(extra).cells()) for extra in EXTRA)
    summary, per = per_defense(df)
    pam, pam_table = pam_vs_ft(df)
    text = (f"## Which defenses hold their removal (issue 24, part a)\n\nmachine: {describe_machine()}; command "
            f"`{command_line(__file__, argv)}`; {dt.datetime.now():%Y-%m-%d %H:%M}; spec "
            f"`{SPEC.relative_to(HERE.parent)}` and {', '.join(f'`{e.relative_to(HERE.parent)}`' for e in EXTRA)} "
            f"({len(df)} of {cells_in_spec} cells finished); probe settings "
            f"{json.dumps(spec.probe_options)}; test-set numbers in %, mean ± standard error over seeds\n\n"
            f"Victims (no defense):\n\n{victims(df)}\n\nPer victim and defense (verdicts on the means: holds = ASR, "
            f"ASR-refresh and P-ASR <= {HELD * 100:.0f}, P-ASR left out where the clean control reaches "
            f"{UNREADABLE * 100:.0f}; superficial = ASR <= {REMOVED * 100:.0f} and a probe "
            f">= {UNDONE * 100:.0f} points above it, P-ASR also that far above the clean control):\n\n{per}\n\n"
            f"PAM minus FT, paired by victim and seed:\n\n{pam_table}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probes24_all_reserved.md", text)
    keep = [c for c in [Col.ATTACK, Col.DEFENSE, Col.DEFENSE_LABEL, Col.SEED, Col.ACC_BEFORE, Col.ASR_BEFORE, Col.ASR_HALF_BEFORE,
                        Col.ASR_REFRESH_BEFORE, Col.P_ASR_BEFORE, Col.P_ASR_CONTROL, *SHOWN, Col.RA_AFTER, Col.DER,
                        Col.P_ACC_AFTER, Col.RETUNE_N, Col.RETUNE_N_POISON, Col.DEFENSE_SECONDS, Col.PROBE_SECONDS,
                        Col.WALL_SECONDS, Col.PROBE_FINGERPRINT] if c in df]
    rows = df[keep].sort_values([Col.ATTACK, Col.DEFENSE_LABEL, Col.SEED]).to_dict("records")
    atomic_write_text(out / "probes24_all_reserved.json", json.dumps(
        {"spec": str(SPEC.relative_to(HERE.parent)), "command": command_line(__file__, argv),
         "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": describe_machine(),
         "cells_done": int(len(df)), "cells_in_spec": cells_in_spec, "probe_options": spec.probe_options,
         "per_defense": summary.to_dict("records"), "pam_vs_ft": pam, "rows": rows}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
