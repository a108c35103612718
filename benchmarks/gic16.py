"""Issue 16: where calibration pays. Runs (or, with --report_only, reads) the placement and objective variants of
GIC under `benchmarks/gic16/`, pairs each with its block's uncalibrated cells, applies the selection rule written in
BENCHMARKS.md before the results, and reports development and held-out blocks apart.

Layout (by name): `<block>.yaml` is a block's baseline (gic: [false, true], true = placement `before`);
`<block>_<variant>.yaml` beside it runs only the calibrated side of one variant (gic: [true]) on the same victims,
defenses, draws and seeds. Blocks named `dev*` are the development blocks (the only ones a choice may look at),
`heldout*` the held-out ones.

    python benchmarks/gic16.py                  # run every block and variant (resumable), then report
    python benchmarks/gic16.py --report_only    # analyse what has finished
    python benchmarks/gic16.py --only dev       # only the blocks whose name starts with dev (the selection's view)

Selection rule (BENCHMARKS.md, "GIC placement and objectives"): over the development blocks' lossy cells (C-Acc loss
> 2 points against reserved), eligible variants keep the mean ASR change <= +1 point and do no harm on train and
reserved; the highest mean C-Acc recovered wins; within 5 points, the higher DER gap closed, then the cheaper.
Outputs: benchmarks/results/gic16.md and benchmarks/results/efficacy_summary.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import IN_DISTRIBUTION, Col, command_line, describe_machine, md_table, run_spec
from backdoorbench_gic.analysis.efficacy import efficacy_report

HERE = Path(__file__).resolve().parent
STUDY = HERE / "gic16"
RESULTS = HERE / "results"
ASR_RISE_LIMIT = 0.01  # issue 16: mean ASR rise on the lossy cells
TIE = 0.05  # C-Acc recovered within this of the best counts as a tie
CALIBRATION_FREE = ("bn-reset", "bn-refresh")  # placements that fit no g: cheaper
BASELINES = ("dev", "dev_sau", "dev_wanet-sig", "heldout", "heldout_sau", "heldout_wanet-sig")


def blocks() -> dict[str, dict[str, Path]]:
    """{block: {variant: spec path}}; the baseline's calibrated side is the variant ``before``."""
    out: dict[str, dict[str, Path]] = {}
    names = sorted(p.stem for p in STUDY.glob("*.yaml"))
    bases = [n for n in names if n in BASELINES]
    for b in bases:
        out[b] = {"before": STUDY / f"{b}.yaml"}
    for n in names:  # a variant belongs to the longest block name it extends (dev_sau_x to dev_sau, not dev)
        owners = [b for b in bases if n.startswith(b + "_")]
        if n not in bases and owners:
            b = max(owners, key=len)
            out[b][n[len(b) + 1:]] = STUDY / f"{n}.yaml"
    return out


def role(block: str) -> str:
    return "development" if block.startswith("dev") else "held-out"


def variant_frame(base_df: pd.DataFrame, spec_path: Path, variant: str, report_only: bool) -> pd.DataFrame:
    """The block's uncalibrated cells with the variant's calibrated ones."""
    off = base_df[~base_df[Col.GIC].astype(bool)]
    if variant == "before":
        on = base_df[base_df[Col.GIC].astype(bool)]
    else:
        _, on, _ = run_spec(str(spec_path), report_only)
        if on.empty:
            return on
    return pd.concat([off, on], ignore_index=True)


def cost(df: pd.DataFrame) -> float:
    """What calibration adds to the base defense's wall time: fit (fresh-fit seconds, kept by cached fits) plus the
    placement's BatchNorm passes, over the uncalibrated purification's seconds; for placements that purify on g(aux)
    the purification itself is the base's."""
    on, off = df[df[Col.GIC].astype(bool)], df[~df[Col.GIC].astype(bool)]
    base = off[Col.DEFENSE_SECONDS].mean()
    add = on.get(Col.GIC_SECONDS, pd.Series(0.0, index=on.index)).fillna(0).mean()
    add += on.get(Col.PLACEMENT_SECONDS, pd.Series(0.0, index=on.index)).fillna(0).mean()
    return float(add / base) if base else math.nan


def shifted_changes(gaps: pd.DataFrame) -> pd.DataFrame:
    """Per victim x base defense, from a report's per-cell gaps: the mean paired change (variant minus uncalibrated)
    of C-Acc and ASR over the shifted sets, in points."""
    sh = gaps[~gaps[Col.AUX_TYPE].isin(IN_DISTRIBUTION)]
    d = sh.assign(dacc=(sh["acc_after_gic"] - sh["acc_after_nogic"]) * 100,
                  dasr=(sh["asr_after_gic"] - sh["asr_after_nogic"]) * 100)
    return d.groupby([Col.ATTACK, Col.BASE_DEFENSE])[["dacc", "dasr"]].mean()


def figures(df: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """The rule's figures of one variant's paired frame, and the efficacy report's per-cell gaps behind them."""
    _, gaps, verdict = efficacy_report(df)
    rise = verdict["asr_rise_on_those"]
    out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in verdict.items()}
    out["cost"] = cost(df)
    out["pairs"] = int(df[Col.GIC].astype(bool).sum())
    out["eligible"] = bool(verdict["no_harm"]) and (rise == rise) and rise <= ASR_RISE_LIMIT
    return out, gaps


def pct(v, digits: int = 0, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 100:+.{digits}f}" if sign else f"{v * 100:.{digits}f}"


def select(pooled: dict[str, dict]) -> str | None:
    ok = {v: f for v, f in pooled.items() if f["eligible"] and f["acc_recovered_mean"] is not None}
    if not ok:
        return None
    best = max(f["acc_recovered_mean"] for f in ok.values())
    tied = [v for v, f in ok.items() if f["acc_recovered_mean"] >= best - TIE]
    return sorted(tied, key=lambda v: (-(ok[v]["der_gap_closed_mean"] or -1.0), v not in CALIBRATION_FREE,
                                       ok[v]["cost"]))[0]


def table(rows: list[list[str]]) -> str:
    return md_table(["block", "role", "variant", "pairs", "lossy cells", "C-Acc recovered (%)", "mean dASR (pts)",
                     "gap cells", "DER gap closed (%)", "no harm", "cost (+% of base)", "eligible"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--only", default="", help="run and report only the blocks whose name starts with this (e.g. dev: "
                                              "the development blocks alone, as the selection must see them)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    os.environ.setdefault("BBGIC_PURIFY_CACHE", "1")

    from backdoorbench_gic.utils.io import atomic_write_text
    from backdoorbench_gic.utils.logs import console_logging

    console_logging()
    per_block: dict[str, dict[str, dict]] = {}
    frames: dict[str, dict[str, pd.DataFrame]] = {}
    gaps: dict[str, dict[str, pd.DataFrame]] = {}  # each variant's per-cell gaps, from the report its figures came from
    specs = blocks()
    for block, variants in specs.items():
        if not block.startswith(args.only):
            continue
        ro = args.report_only
        _, base_df, _ = run_spec(str(variants["before"]), ro)
        if base_df.empty:
            continue
        for variant, path in variants.items():
            df = variant_frame(base_df, path, variant, ro)
            if df.empty or df[Col.GIC].astype(bool).sum() == 0:
                continue
            frames.setdefault(block, {})[variant] = df
            per_block.setdefault(block, {})[variant], gaps.setdefault(block, {})[variant] = figures(df)
    rows, pooled = [], {}
    for r in ("development", "held-out"):
        names = [b for b in per_block if role(b) == r]
        variants = sorted({v for b in names for v in per_block[b]})
        for v in variants:
            dfs = [frames[b][v] for b in names if v in frames[b]]
            if len(dfs) == len(names) and len(names) > 1:
                pooled[(r, v)], _ = figures(pd.concat(dfs, ignore_index=True))
        for b in names:
            for v, f in per_block[b].items():
                rows.append([b, r, v, f["pairs"], f["acc_loss_cells"], pct(f["acc_recovered_mean"]),
                             pct(f["asr_rise_on_those"], 1, True), f["der_gap_cells"], pct(f["der_gap_closed_mean"]),
                             "ok" if f["no_harm"] else "MISS", pct(f["cost"]), "yes" if f["eligible"] else "no"])
    for (r, v), f in pooled.items():
        rows.append([f"pooled {r}", r, v, f["pairs"], f["acc_loss_cells"], pct(f["acc_recovered_mean"]),
                     pct(f["asr_rise_on_those"], 1, True), f["der_gap_cells"], pct(f["der_gap_closed_mean"]),
                     "ok" if f["no_harm"] else "MISS", pct(f["cost"]), "yes" if f["eligible"] else "no"])
    dev_names = [b for b in per_block if role(b) == "development"]
    dev = ({v: f for (r, v), f in pooled.items() if r == "development"} if len(dev_names) > 1
           else per_block.get(dev_names[0], {}) if dev_names else {})
    chosen = select(dev)
    change_rows = []
    for b in per_block:
        for v, g in gaps[b].items():
            for (attack, defense), r in shifted_changes(g).iterrows():
                change_rows.append([b, v, attack, defense, f"{r['dacc']:+.1f}", f"{r['dasr']:+.1f}"])
    changes = md_table(["block", "variant", "victim", "defense", "mean dC-Acc on shifted sets (pts)",
                        "mean dASR on shifted sets (pts)"], change_rows)
    cmd = command_line(__file__, argv)
    text = (f"## GIC placement and objectives (issue 16)\n\nmachine: {describe_machine()}; command `{cmd}`; "
            f"{dt.datetime.now():%Y-%m-%d %H:%M}\n\n" + table(rows) + "\n\n"
            + (f"Selected on the development blocks: **{chosen}**" if chosen else
               "No variant is eligible on the development blocks: the packaged default stays `before`") + "\n\n"
            + "Per victim and defense, the paired change on the shifted sets (all of them, lossy or not):\n\n"
            + changes + "\n")
    summary = {"generated": dt.datetime.now().isoformat(timespec="seconds"), "asr_rise_limit": ASR_RISE_LIMIT,
               "selected": chosen,  # None: no variant met the rule
               "packaged_default": chosen or "before",
               "blocks": [{"block": b, "role": role(b), "variant": v, "spec": str(specs[b][v].relative_to(HERE.parent)),
                           **f} for b in per_block for v, f in per_block[b].items()],
               "pooled": [{"role": r, "variant": v, **f} for (r, v), f in pooled.items()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gic16.md", text)
    atomic_write_text(out / "efficacy_summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
