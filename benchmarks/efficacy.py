"""GIC efficacy: purification with and without Guided Input Calibration, per auxiliary-data type, against the
targets of the GIC issue (never tuned on test ASR; every number is a paired comparison over the same victims,
auxiliary draws and seeds).

Targets (gic-method.md section 1 for DER and the gap):
- C-Acc recovered: on shifted sets whose uncalibrated purification loses > 2 C-Acc points against `reserved`,
  GIC recovers >= 50 % of that loss on average, while mean ASR rises by <= 2 points;
- DER gap closed: >= 50 % on average wherever DER(reserved) - DER(S) > 0.02;
- no harm: on `train` and `reserved`, |mean dDER| <= 0.01 and mean dC-Acc >= -0.5 points.

    python benchmarks/efficacy.py                                  # CPU profile: benchmarks/efficacy.yaml
    python benchmarks/efficacy.py --spec benchmarks/efficacy_gpu.yaml
    python benchmarks/efficacy.py --report_only                    # re-analyse finished cells
    python benchmarks/efficacy.py --spec V.yaml --baseline_spec B.yaml  # a GIC-only variant against B's uncalibrated cells

It makes the Fashion-MNIST split when missing (the spec's attacks generate their victims), runs the matrix
(resumable: a rerun skips finished cells), writes the matrix report under <output_root>/report/ and the analysis
to benchmarks/results/efficacy_<name>.md and .csv.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from backdoorbench_gic.matrix.report import markdown_table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from speed import cpu_model  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

RESULTS = HERE / "results"
IN_DISTRIBUTION = ("train", "reserved")


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def ensure_splits(spec) -> None:
    """Make every `<ds>_split_<pct>_seed_<s>` that a generated attack needs (BackdoorBenchER's layout)."""
    from backdoorbench_gic.auxdata import make_split
    from backdoorbench_gic.data.specs import SPLIT_RE

    for a in spec.attacks:
        m = SPLIT_RE.match(str((a.generate or {}).get("dataset", "")))
        if m and not (spec.bb_root / "data" / m.group(0)).is_dir():
            make_split(m["base"], int(m["pct"]) / 100.0, int(m["seed"]), dataset_path="./data", bb_root=spec.bb_root)


def _se(x: pd.Series) -> float:
    x = x.dropna()
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def paired(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (attack, defense, aux, size, seed) holding the without- and with-GIC numbers side by side."""
    keys = ["attack", "base_defense", "aux_type", "aux_size_label", "seed"]
    cols = ["acc_after", "asr_after", "ra_after", "der", "acc_before", "asr_before"]
    off = df[~df["gic"]].set_index(keys)[cols]
    on = df[df["gic"]].set_index(keys)
    extra = [c for c in ("extra_bn_div_before", "extra_bn_div_after", "extra_drift_ratio", "extra_drift_flag",
                         "extra_gic_seconds", "extra_gic_cached", "extra_gic_steps", "extra_base_seconds",
                         "defense_seconds") if c in on]
    on = on[cols[:4] + extra]
    both = off.merge(on, left_index=True, right_index=True, suffixes=("_nogic", "_gic")).reset_index()
    for c in ("acc_after", "asr_after", "ra_after", "der"):
        both[f"d_{c}"] = both[f"{c}_gic"] - both[f"{c}_nogic"]
    return both


def reference_gaps(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per (attack, defense, size): the uncalibrated reserved-set C-Acc and DER, the denominators of the targets."""
    ref = (pairs[pairs["aux_type"] == "reserved"]
           .groupby(["attack", "base_defense", "aux_size_label"])[["acc_after_nogic", "der_nogic"]].mean()
           .rename(columns={"acc_after_nogic": "acc_reserved", "der_nogic": "der_reserved"}))
    cell = (pairs.groupby(["attack", "base_defense", "aux_type", "aux_size_label"])
            [["acc_after_nogic", "acc_after_gic", "asr_after_nogic", "asr_after_gic", "der_nogic", "der_gic"]].mean())
    out = cell.join(ref, on=["attack", "base_defense", "aux_size_label"]).reset_index()
    out["acc_loss"] = out["acc_reserved"] - out["acc_after_nogic"]
    out["acc_recovered"] = np.where(out["acc_loss"] > 0.02,
                                    (out["acc_after_gic"] - out["acc_after_nogic"]) / out["acc_loss"], np.nan)
    out["der_gap"] = out["der_reserved"] - out["der_nogic"]
    out["der_gap_closed"] = np.where(out["der_gap"] > 0.02, (out["der_gic"] - out["der_nogic"]) / out["der_gap"],
                                     np.nan)
    return out


def pm(mean: float, se: float, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    if mean != mean:
        return "-"
    m = f"{mean * scale:+.{digits}f}" if sign else f"{mean * scale:.{digits}f}"
    return m if se != se else f"{m} ± {se * scale:.{digits}f}"


def analyse(df: pd.DataFrame) -> tuple[str, pd.DataFrame, dict]:
    pairs = paired(df)
    gaps = reference_gaps(pairs)
    parts: list[str] = []
    verdict: dict[str, object] = {}

    # 1. per defense x aux, pooled over attacks and seeds (each pair: same victim, same draw, same seed)
    rows = []
    for (d, aux, size), g in pairs.groupby(["base_defense", "aux_type", "aux_size_label"], sort=False):
        rows.append([d, aux, size, len(g),
                     pm(g["acc_after_nogic"].mean(), _se(g["acc_after_nogic"])),
                     pm(g["acc_after_gic"].mean(), _se(g["acc_after_gic"])),
                     pm(g["d_acc_after"].mean(), _se(g["d_acc_after"]), sign=True),
                     pm(g["asr_after_nogic"].mean(), _se(g["asr_after_nogic"])),
                     pm(g["asr_after_gic"].mean(), _se(g["asr_after_gic"])),
                     pm(g["d_asr_after"].mean(), _se(g["d_asr_after"]), sign=True),
                     pm(g["der_nogic"].mean(), _se(g["der_nogic"]), 1, 3),
                     pm(g["der_gic"].mean(), _se(g["der_gic"]), 1, 3),
                     pm(g["d_der"].mean(), _se(g["d_der"]), 1, 3, sign=True),
                     f"{g['extra_bn_div_before'].mean():.3f} -> {g['extra_bn_div_after'].mean():.3f}"
                     if "extra_bn_div_before" in g else "-"])
    parts.append("### Without vs with GIC (mean ± standard error over attacks x seeds; d = paired difference)\n\n"
                 + md_table(["defense", "aux", "size", "pairs", "C-Acc", "C-Acc +GIC", "dC-Acc", "ASR", "ASR +GIC",
                             "dASR", "DER", "DER +GIC", "dDER", "D_BN aux -> g(aux)"], rows))

    # 2. targets
    shifted = gaps[~gaps["aux_type"].isin(IN_DISTRIBUTION)]
    lossy = shifted[shifted["acc_loss"] > 0.02]
    rec = float(lossy["acc_recovered"].mean()) if len(lossy) else math.nan
    keys = ["attack", "base_defense", "aux_type", "aux_size_label"]
    lossy_pairs = pairs.merge(lossy[keys], on=keys)
    asr_rise = float(lossy_pairs["d_asr_after"].mean()) if len(lossy_pairs) else math.nan
    gapped = shifted[shifted["der_gap"] > 0.02]
    closed = float(gapped["der_gap_closed"].mean()) if len(gapped) else math.nan
    harm = pairs[pairs["aux_type"].isin(IN_DISTRIBUTION)]
    harm_rows, harm_ok = [], True
    for (d, aux), g in harm.groupby(["base_defense", "aux_type"]):
        ddr, dacc = g["d_der"].mean(), g["d_acc_after"].mean()
        ok = abs(ddr) <= 0.01 and dacc >= -0.005
        harm_ok &= bool(ok)
        harm_rows.append([d, aux, len(g), pm(dacc, _se(g["d_acc_after"]), sign=True),
                          pm(ddr, _se(g["d_der"]), 1, 3, sign=True), "ok" if ok else "MISS"])
    verdict.update({
        "acc_loss_cells": int(len(lossy)), "acc_recovered_mean": rec, "asr_rise_on_those": asr_rise,
        "der_gap_cells": int(len(gapped)), "der_gap_closed_mean": closed, "no_harm": harm_ok,
    })
    t = [["C-Acc recovered on shifted sets losing > 2 pts", f"{len(lossy)} of {len(shifted)} cells",
          pm(rec, math.nan, digits=0) + " %", ">= 50 %", "ok" if rec >= 0.5 else "MISS"],
         ["mean ASR change on those cells", f"{len(lossy_pairs)} pairs", pm(asr_rise, math.nan, sign=True) + " pts",
          "<= +2 pts", "ok" if asr_rise <= 0.02 else "MISS"],
         ["DER gap closed where the gap > 0.02", f"{len(gapped)} of {len(shifted)} cells",
          pm(closed, math.nan, digits=0) + " %", ">= 50 %", "ok" if closed >= 0.5 else "MISS"],
         ["no harm on train/reserved", f"{len(harm)} pairs", "see below", "|dDER| <= 0.01, dC-Acc >= -0.5 pts",
          "ok" if harm_ok else "MISS"]]
    for r in t:
        if r[2].split()[0] == "-":
            r[4] = "n/a (no such cell)"
    parts.append("### Targets\n\n" + md_table(["target", "over", "measured", "wanted", "verdict"], t))
    parts.append("No harm, per defense (paired over attacks x seeds):\n\n"
                 + md_table(["defense", "aux", "pairs", "dC-Acc (pts)", "dDER", "verdict"], harm_rows))

    # 3. the gap table per cell (attack x defense x shifted aux)
    grow = [[r.attack, r.base_defense, r.aux_type, r.aux_size_label, f"{r.acc_reserved * 100:.1f}",
             f"{r.acc_after_nogic * 100:.1f}", f"{r.acc_after_gic * 100:.1f}",
             "-" if r.acc_recovered != r.acc_recovered else f"{r.acc_recovered * 100:.0f} %",
             f"{r.der_reserved:.3f}", f"{r.der_nogic:.3f}", f"{r.der_gic:.3f}",
             "-" if r.der_gap_closed != r.der_gap_closed else f"{r.der_gap_closed * 100:.0f} %"]
            for r in shifted.itertuples()]
    parts.append("### Per victim: the loss against `reserved` and what GIC recovers (means over seeds)\n\n"
                 + md_table(["attack", "defense", "aux", "size", "C-Acc reserved", "C-Acc S", "C-Acc S+GIC",
                             "C-Acc recovered", "DER reserved", "DER S", "DER S+GIC", "DER gap closed"], grow))

    # 4. drift and cost
    if "extra_drift_ratio" in pairs:
        fl = pairs.groupby("aux_type")[["extra_drift_ratio", "extra_drift_flag"]].mean()
        parts.append("### Drift monitor (label-free): predicted share of the most-grown class over its label share "
                     "after calibration; flag = ratio above the warning level\n\n"
                     + md_table(["aux", "mean ratio", "share flagged"],
                                [[a, f"{r.extra_drift_ratio:.2f}", f"{r.extra_drift_flag * 100:.0f} %"]
                                 for a, r in fl.iterrows()]))
    if "extra_gic_seconds" in pairs and "extra_base_seconds" in pairs:
        fresh = pairs[pairs.get("extra_gic_cached", 0) == 0]
        cost = []
        for d, g in pairs.groupby("base_defense"):
            fresh_d = fresh[fresh["base_defense"] == d]
            fit, base = fresh_d["extra_gic_seconds"], g["extra_base_seconds"]
            steps = fresh_d.get("extra_gic_steps", pd.Series(dtype=float))
            cost.append([d, f"{fit.mean():.1f}" if len(fit) else "(cached)",
                         f"{steps.mean():.0f}" if len(steps.dropna()) else "-", f"{base.mean():.1f}",
                         f"{fit.mean() / base.mean() * 100:.0f} %" if len(fit) else "-"])
        parts.append("### Cost (seconds per cell; a fit is cached and reused across base defenses)\n\n"
                     + md_table(["defense", "GIC fit (fresh fits)", "fit steps run (early stopping)", "base defense",
                                 "fit / base"], cost))
    return "\n\n".join(parts), gaps, verdict


def run_spec(spec_path: str, report_only: bool, executor_overrides: dict | None = None):
    """Load a matrix spec and, unless ``report_only``, make its missing splits and run it (resumable); then
    collect the finished cells. Returns (spec, results, seconds this invocation ran)."""
    from backdoorbench_gic.matrix import collect_results, load_spec, run_matrix

    spec = load_spec(spec_path)
    t0 = time.time()
    if not report_only:
        ensure_splits(spec)
        print(f"matrix: {run_matrix(spec, executor_overrides).counts}")
    return spec, collect_results(spec.output_root), time.time() - t0


def baseline_spec(spec, baseline_path: str):
    """The baseline whose uncalibrated cells pair with a spec that runs only the calibrated side (a GIC variant:
    other budget or objective). Refused unless both specs purify the same victims with the same base defenses,
    overrides, defaults and test subset, so every pair still differs in GIC alone."""
    from backdoorbench_gic.matrix import load_spec

    base = load_spec(baseline_path)
    same = {"attacks": [a.record for a in spec.attacks] == [a.record for a in base.attacks],
            "defenses": [(d.name, d.overrides) for d in spec.defenses] == [(d.name, d.overrides) for d in base.defenses],
            "defaults": spec.defaults == base.defaults, "eval_limit": spec.eval_limit == base.eval_limit,
            "bb_root": spec.bb_root == base.bb_root}
    differ = [k for k, ok in same.items() if not ok]
    if differ:
        raise SystemExit(f"--baseline_spec {baseline_path}: its {', '.join(differ)} differ from {spec.path}'s; "
                         "the uncalibrated cells would not pair with this spec's")
    if list(spec.gic) != [True] or False not in base.gic:
        raise SystemExit("--baseline_spec pairs a spec with gic: [true] only against a baseline that has uncalibrated "
                         f"cells; got gic {spec.gic} and the baseline's {base.gic}")
    return base


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """The package's Markdown table without its trailing newline: these reports join their blocks themselves."""
    return markdown_table(header, rows).rstrip("\n")


def frame_table(df: pd.DataFrame, floatfmt: dict[str, int]) -> str:
    """A DataFrame as a Markdown table, the float cells of the columns in ``floatfmt`` to that many decimals."""
    rows = [[(f"{v:.{floatfmt[c]}f}" if c in floatfmt and isinstance(v, float) else v) for c, v in r.items()]
            for r in df.to_dict("records")]
    return md_table(list(df.columns), rows)


def victims_table(df: pd.DataFrame) -> str:
    v = df.groupby("attack")[["acc_before", "asr_before", "ra_before"]].first()
    return md_table(["victim", "C-Acc", "ASR", "RA"],
                    [[a, f"{r.acc_before * 100:.2f}", f"{r.asr_before * 100:.2f}", f"{r.ra_before * 100:.2f}"]
                     for a, r in v.iterrows()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(HERE / "efficacy.yaml"))
    p.add_argument("--report_only", action="store_true", help="analyse the finished cells; run nothing")
    p.add_argument("--workers", type=int, default=None, help="override the spec's local worker count")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--baseline_spec", default=None,
                   help="take the uncalibrated cells from this finished spec's run (for a spec with gic: [true])")
    args = p.parse_args(argv)

    from backdoorbench_gic.matrix import write_report
    from backdoorbench_gic.utils.io import atomic_write_text
    from backdoorbench_gic.utils.logs import console_logging

    console_logging()
    base = None
    if args.baseline_spec:  # checked before anything runs
        from backdoorbench_gic.matrix import load_spec

        base = baseline_spec(load_spec(args.spec), args.baseline_spec)
    spec, df, wall = run_spec(args.spec, args.report_only, {"workers": args.workers} if args.workers else None)
    if df.empty:
        print("no finished cells", file=sys.stderr)
        return 1
    write_report(spec.output_root)
    baseline, ran = "", len(df)
    if base is not None:
        from backdoorbench_gic.matrix import collect_results

        off = collect_results(base.output_root)
        off = off[~off["gic"].astype(bool)]
        df = pd.concat([off, df], ignore_index=True)
        baseline = f"; uncalibrated cells: {len(off)} from `{Path(args.baseline_spec).name}`'s run"
    text, gaps, verdict = analyse(df)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix().split("/work/main/")[-1], *sys.argv[1:]])
    header = (f"## GIC efficacy: `{spec.name}`\n\n"
              f"Spec `{Path(args.spec).name}`; {ran} finished cells of {len(spec.cells())}{baseline}; "
              f"machine: {machine()}; "
              f"command `{cmd}`; {dt.datetime.now():%Y-%m-%d %H:%M}"
              + (f"; this invocation ran {wall / 60:.1f} min" if not args.report_only else "")
              + f"; test subset: {int(df['eval_n_clean'].iloc[0])} clean / {int(df['eval_n_bd'].iloc[0])} poisoned images.\n\n"
              + "Victims:\n\n" + victims_table(df))
    atomic_write_text(out / f"efficacy_{spec.name}.md", header + "\n\n" + text + "\n")
    gaps.to_csv(out / f"efficacy_{spec.name}.csv", index=False)
    print(header + "\n\n" + text)
    print(f"\nverdict: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
