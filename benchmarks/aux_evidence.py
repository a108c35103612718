"""Does the auxiliary-data diagnostic predict what purification will cost? Joins `bbgic aux-quality`'s columns per
auxiliary type (benchmarks/aux_quality.py on each victim, `aux_quality_<victim>.csv`) with the uncalibrated cells of
finished efficacy blocks (`efficacy_<block>.csv`, one row per attack x defense x auxiliary type, means over seeds),
and reports, per block, victim and defense, the Spearman rank correlation of each column with the C-Acc that
purification lost against `reserved` (`acc_loss` = C-Acc(reserved) - C-Acc(type)).

    python benchmarks/aux_quality.py --result_file badnet_fm_cnn16 --bb_root bbgic_bench --n_per_class 20 --seed 0 1 2
    python benchmarks/aux_evidence.py                       # every benchmarks/results/efficacy_*.csv
    python benchmarks/aux_evidence.py --efficacy benchmarks/results/efficacy_new.csv ...   # add a finished block

Any finished efficacy CSV can be added; a type it holds that a victim's quality CSV lacks is listed with the
command that measures it (`benchmarks/aux_quality.py --types T --append`). Blocks whose uncalibrated cells repeat an
earlier block's (a GIC-only budget spec paired with its baseline) are counted once. `--design` names the blocks
and victims the headline was designed on; every other group is validation, and types absent from the design
groups are held-out shifts. The scores never see test data: only the victim and the auxiliary set.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from backdoorbench_gic.analysis import md_table, spearman
from backdoorbench_gic.auxdata.quality import HEADLINE, SIGNAL_DIRECTIONS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUTCOMES = {"acc_loss": "acc_loss", "acc_after": "acc_after_nogic", "asr_after": "asr_after_nogic", "der": "der_nogic"}
TARGET_RHO = 0.7
# the headline's form was chosen on the 20-per-class block (benchmarks/efficacy.yaml: both victims, FT, FST, SAU);
# the 5 % blocks (2,850-image sets, regenerated victims, SAU at its packaged schedule) and later blocks are validation
DEFAULT_DESIGN = ["efficacy-cpu"]


def block_name(path: Path) -> str:
    stem = path.stem
    return stem[len("efficacy_"):] if stem.startswith("efficacy_") else stem


def load_blocks(paths: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """The uncalibrated cells of every block, one row per (block, attack, defense, size, type); repeats dropped."""
    frames, notes, seen = [], [], {}
    for path in paths:
        df = pd.read_csv(path)
        missing = {"attack", "base_defense", "aux_type", "aux_size_label", "acc_after_nogic"} - set(df.columns)
        if missing:
            raise SystemExit(f"{path}: not an efficacy CSV (missing {', '.join(sorted(missing))})")
        name = block_name(path)
        keep = []
        for key, g in df.groupby(["attack", "base_defense", "aux_size_label"]):
            sig = (key, tuple(np.round(g.sort_values("aux_type")["acc_after_nogic"].to_numpy(), 9)),
                   tuple(sorted(g["aux_type"])))
            if sig in seen:
                notes.append(f"`{name}` {key[0]} {key[1]} {key[2]}: the same uncalibrated cells as `{seen[sig]}`, "
                             "counted once")
                continue
            seen[sig] = name
            keep.append(g)
        if keep:
            b = pd.concat(keep)
            b.insert(0, "block", name)
            if "acc_loss" not in b:
                ref = b[b["aux_type"] == "reserved"].set_index(["attack", "base_defense", "aux_size_label"])
                b["acc_loss"] = [ref["acc_after_nogic"].get((r.attack, r.base_defense, r.aux_size_label), np.nan)
                                 - r.acc_after_nogic for r in b.itertuples()]
            frames.append(b)
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def is_design(block: str, attack: str, design: list[str]) -> bool:
    return any(d == block or d == f"{block}:{attack}" for d in design)


def correlations(joined: pd.DataFrame, signals: list[str], design: list[str]) -> pd.DataFrame:
    rows = []
    for (block, attack, defense, size), g in joined.groupby(["block", "attack", "base_defense", "aux_size_label"]):
        row = {"block": block, "victim": attack, "defense": defense, "size": size, "types": len(g),
               "role": "design" if is_design(block, attack, design) else "validation"}
        for s in signals:
            for o, col in OUTCOMES.items():
                row[f"{s}|{o}"] = spearman(g[s], g[col]) if s in g else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:+.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--efficacy", nargs="+", default=None,
                   help="finished efficacy CSVs (default: every benchmarks/results/efficacy_*.csv)")
    p.add_argument("--quality_dir", default=str(RESULTS), help="folder of aux_quality_<victim>.csv")
    p.add_argument("--design", nargs="*", default=DEFAULT_DESIGN,
                   help="BLOCK or BLOCK:VICTIM groups the headline was designed on (the rest is validation)")
    p.add_argument("--out", default=str(RESULTS / "aux_evidence.md"))
    args = p.parse_args(argv)

    from backdoorbench_gic.utils.io import atomic_write_text

    # a baseline block before the variants that reuse its uncalibrated cells (efficacy-cpu-5pct before -5pct-budget)
    paths = [Path(x) for x in args.efficacy] if args.efficacy else sorted(RESULTS.glob("efficacy_*.csv"),
                                                                         key=lambda x: (len(x.stem), x.stem))
    cells, notes = load_blocks(paths)
    if cells.empty:
        print("no efficacy cells", file=sys.stderr)
        return 1
    joined, missing = [], []
    for attack, g in cells.groupby("attack"):
        qpath = Path(args.quality_dir) / f"aux_quality_{attack}.csv"
        if not qpath.is_file():
            missing.append(f"{attack}: no {qpath.name}; run `python benchmarks/aux_quality.py --result_file {attack} "
                           "--bb_root bbgic_bench --n_per_class 20 --seed 0 1 2`")
            continue
        q = pd.read_csv(qpath).rename(columns={"reserved_type": "aux_type"}).drop_duplicates("aux_type", keep="last")
        absent = sorted(set(g["aux_type"]) - set(q["aux_type"]))
        if absent:
            missing.append(f"{attack}: {qpath.name} lacks {', '.join(absent)}; run `python benchmarks/aux_quality.py "
                           f"--result_file {attack} --bb_root bbgic_bench --n_per_class 20 --seed 0 1 2 --append --types "
                           + " ".join(f"'{t}'" for t in absent) + "`")
        joined.append(g.merge(q, on="aux_type", how="inner", suffixes=("", "_q")))
    for m in missing:
        print("missing:", m, file=sys.stderr)
    if not joined:
        return 1
    j = pd.concat(joined, ignore_index=True)
    signals = [s for s in SIGNAL_DIRECTIONS if s in j.columns]
    corr = correlations(j, signals, args.design)
    design_types = set(j[[is_design(b, a, args.design) for b, a in zip(j["block"], j["attack"])]]["aux_type"])
    held_out = sorted(set(j["aux_type"]) - design_types)

    key = f"{HEADLINE}|acc_loss"
    val = corr[corr["role"] == "validation"]
    ok = corr[key] >= TARGET_RHO  # signed: a higher risk must mean more C-Acc lost
    out = [f"## Auxiliary-data diagnostic vs the C-Acc purification loses\n\n"
           f"{dt.datetime.now():%Y-%m-%d %H:%M}; `python benchmarks/aux_evidence.py"
           + (" --efficacy " + " ".join(Path(x).name for x in args.efficacy) if args.efficacy else "") + "`. "
           f"Efficacy blocks (uncalibrated cells, means over seeds): {', '.join(f'`{b}`' for b in cells['block'].unique())}. "
           f"Scores: `benchmarks/aux_quality.py` per victim (`aux_quality_<victim>.csv`). Spearman rho over the "
           f"auxiliary types of each block, victim and defense; `acc_loss` = C-Acc(reserved) - C-Acc(type). "
           f"Designed on: {', '.join(args.design) or 'nothing'}; held-out types (in no design group): "
           f"{', '.join(held_out) or 'none'}.\n"]
    out.append(f"**Headline `{HEADLINE}` vs C-Acc lost: rho >= +{TARGET_RHO} in {int(ok.sum())} of {len(corr)} groups "
               f"(validation: {int((val[key] >= TARGET_RHO).sum())} of {len(val)}); rho from "
               f"{corr[key].min():+.3f} to {corr[key].max():+.3f}"
               + (f"; below {TARGET_RHO}: " + ", ".join(f"{r['block']} {r['victim']} {r['defense']} {r[key]:+.3f}"
                                                       for _, r in corr[~ok].iterrows()) if (~ok).any() else "")
               + ".**\n")
    out.append("Per block, victim and defense, rho of each column with the C-Acc lost (a good column: positive for "
               "`" + HEADLINE + "` and the other lower-is-better columns):\n\n" + md_table(
                   ["block", "victim", "defense", "size", "types", "role"] + signals,
                   [[r["block"], r["victim"], r["defense"], r["size"], r["types"], r["role"]]
                    + [fmt(r[f"{s}|acc_loss"]) for s in signals] for _, r in corr.iterrows()]))
    out.append(f"`{HEADLINE}` against the other outcomes (C-Acc after, ASR after, DER):\n\n" + md_table(
        ["block", "victim", "defense", "rho vs acc_loss", "rho vs acc_after", "rho vs asr_after", "rho vs der"],
        [[r["block"], r["victim"], r["defense"]] + [fmt(r[f"{HEADLINE}|{o}"]) for o in OUTCOMES]
         for _, r in corr.iterrows()]))
    pooled = {d: spearman(g[HEADLINE], g["acc_loss"]) for d, g in j.groupby("base_defense")}
    per_def = corr.groupby("defense")[key].min()
    out.append("Per defense: " + "; ".join(
        f"{d}: smallest rho over its groups {per_def[d]:+.3f}, rho over all its cells pooled "
        f"({int((j['base_defense'] == d).sum())} block x victim x type means) {pooled[d]:+.2f}" for d in per_def.index)
        + ".")
    show = [c for c in (HEADLINE, "verdict", "bn_div", "entropy", "hist_tvd", "fd") if c in j.columns]
    first = j[j["block"] == j["block"].iloc[0]].sort_values(["attack", "base_defense", HEADLINE])
    out.append(f"Per type, block `{first['block'].iloc[0]}` (sorted by `{HEADLINE}`):\n\n" + md_table(
        ["victim", "defense", "aux"] + show + ["C-Acc after", "C-Acc lost"],
        [[r["attack"], r["base_defense"], r["aux_type"]]
         + [(f"{r[c]:.4g}" if isinstance(r[c], (float, np.floating)) else str(r[c])) for c in show]
         + [f"{r['acc_after_nogic'] * 100:.1f}", f"{r['acc_loss'] * 100:+.1f}"] for _, r in first.iterrows()]))
    if notes or missing:
        out.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes + [f"missing: {m}" for m in missing]))
    text = "\n\n".join(out) + "\n"
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
