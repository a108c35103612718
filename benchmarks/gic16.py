"""Issue 16: where calibration pays. Runs (or, with --report_only, reads) the placement and objective variants of
GIC under `benchmarks/gic16/`, pairs each with its block's uncalibrated cells, applies the two selection rules
written in BENCHMARKS.md before their confirmation results, and reports development and held-out blocks apart.

Layout (by name): a block is a spec that runs uncalibrated cells (`gic: [false, true]`; its calibrated side is the
variant its `gic_overrides` name, `before` with the prompt when it has none); `<block>_<variant>.yaml` beside it runs
only the calibrated side of one more variant (gic: [true]) on the same victims, defenses, draws and seeds. Blocks
named `dev*` are the development blocks (the only ones a choice may look at), `heldout*` the first protocol's
held-out ones, `fresh*` the per-base protocol's fresh held-out ones, `preact*` the confirmation on
PreActResNet-18 victims (reported apart, read by no rule).

    python benchmarks/gic16.py                  # run every block and variant (resumable), then report
    python benchmarks/gic16.py --report_only    # analyse what has finished
    python benchmarks/gic16.py --only dev       # only the blocks whose name starts with dev (the selection's view)

First protocol (BENCHMARKS.md, "GIC placement and objectives"): over the lossy cells (C-Acc loss > 2 points against
reserved) of its development blocks pooled over base defenses, eligible variants keep the mean ASR change <= +1 point
and do no harm on train and reserved (symmetric bound); the highest mean C-Acc recovered wins; within 5 points, the
higher DER gap closed, then the cheaper. Per-base protocol ("Per-base-defense selection"): the same per base defense,
with the one-sided no-harm bound, something recovered and at least 4 lossy cells; a selected variant becomes that
base's default only if the fresh blocks confirm it against the issue's targets. The rules are
`backdoorbench_gic.analysis.selection`. Outputs: benchmarks/results/gic16.md and efficacy_summary.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import pandas as pd
import yaml

from backdoorbench_gic.analysis import IN_DISTRIBUTION, Col, command_line, describe_machine, md_table
from backdoorbench_gic.matrix import run_spec
from backdoorbench_gic.analysis.selection import Rule, by_base, confirm, confirmed, select, variant_figures

HERE = Path(__file__).resolve().parent
STUDY = HERE / "gic16"
RESULTS = HERE / "results"
CALIBRATION_FREE = ("bn-reset", "bn-refresh")  # placements that fit no g: cheaper
# the first protocol: pooled over base defenses, symmetric no-harm bound, over the blocks it was written for
FIRST_RULE = Rule(asr_rise_limit=0.01)
FIRST_BLOCKS = ("dev", "dev_sau", "dev_wanet-sig", "heldout", "heldout_sau", "heldout_wanet-sig")
# the per-base protocol: each base defense alone, one-sided no harm, something recovered, at least 4 lossy cells;
# confirmed on the fresh blocks (never used before it was written)
PER_BASE_RULE = Rule(asr_rise_limit=0.01, one_sided_harm=True, min_recovered=0.0, min_lossy_cells=4)
ROLES = {"dev": "development", "heldout": "held-out", "fresh": "fresh held-out",
         "preact": "PreActResNet-18 confirmation"}


def role(block: str) -> str:
    return next(r for prefix, r in ROLES.items() if block.startswith(prefix))


def calibrated_variant(spec: dict) -> str:
    """The name of the variant a baseline spec (its parsed yaml) runs on its calibrated side: its placement, + its
    family if not the prompt (``before``, ``before+generator``)."""
    o = spec.get("gic_overrides") or {}
    family = o.get("family", "prompt")
    return o.get("placement", "before") + ("" if family == "prompt" else f"+{family}")


def blocks() -> dict[str, dict[str, Path]]:
    """{block: {variant: spec path}}. A block is a spec that runs uncalibrated cells (gic lists false); its own
    calibrated side is the variant :func:`calibrated_variant` names; every other spec beside it whose name extends
    the block's (``<block>_<variant>.yaml``, gic: [true]) is one more variant on the same cells."""
    out: dict[str, dict[str, Path]] = {}
    paths = {p.stem: p for p in sorted(STUDY.glob("*.yaml"))}
    parsed = {n: yaml.safe_load(p.read_text()) or {} for n, p in paths.items()}
    bases = [n for n in paths if False in (parsed[n].get("gic") or [])]
    for b in bases:
        out[b] = {calibrated_variant(parsed[b]): paths[b]}
    for n in paths:  # a variant belongs to the longest block name it extends (dev_sau_x to dev_sau, not dev)
        owners = [b for b in bases if n.startswith(b + "_")]
        if n not in bases and owners:
            b = max(owners, key=len)
            out[b][n[len(b) + 1:]] = paths[n]
    return out


def variant_frame(base_df: pd.DataFrame, spec_path: Path, own: bool, report_only: bool) -> pd.DataFrame:
    """The block's uncalibrated cells with the variant's calibrated ones (``own``: the block spec's own side)."""
    off = base_df[~base_df[Col.GIC].astype(bool)]
    if own:
        on = base_df[base_df[Col.GIC].astype(bool)]
    else:
        _, on, _ = run_spec(str(spec_path), report_only)
        if on.empty:
            return on
    return pd.concat([off, on], ignore_index=True)


def shifted_changes(gaps: pd.DataFrame) -> pd.DataFrame:
    """Per victim x base defense, from a report's per-cell gaps: the mean paired change (variant minus uncalibrated)
    of C-Acc and ASR over the shifted sets, in points."""
    sh = gaps[~gaps[Col.AUX_TYPE].isin(IN_DISTRIBUTION)]
    d = sh.assign(dacc=(sh["acc_after_gic"] - sh["acc_after_nogic"]) * 100,
                  dasr=(sh["asr_after_gic"] - sh["asr_after_nogic"]) * 100)
    return d.groupby([Col.ATTACK, Col.BASE_DEFENSE])[["dacc", "dasr"]].mean()


def figures(df: pd.DataFrame, rule: Rule = FIRST_RULE) -> tuple[dict, pd.DataFrame]:
    """The figures of one variant's paired frame with the rule's eligibility, and the per-cell gaps behind them."""
    fig, gaps = variant_figures(df)
    fig["eligible"] = rule.eligible(fig)
    return fig, gaps


def pct(v, digits: int = 0, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v * 100:+.{digits}f}" if sign else f"{v * 100:.{digits}f}"


def row(name: str, r: str, v: str, f: dict) -> list:
    return [name, r, v, f["pairs"], f["acc_loss_cells"], pct(f["acc_recovered_mean"]),
            pct(f["asr_rise_on_those"], 1, True), f["der_gap_cells"], pct(f["der_gap_closed_mean"]),
            "ok" if f["no_harm"] else "MISS", "ok" if f["no_harm_one_sided"] else "MISS", pct(f["cost"]),
            "yes" if f["eligible"] else "no"]


def table(rows: list[list]) -> str:
    return md_table(["block", "role", "variant", "pairs", "lossy cells", "C-Acc recovered (%)", "mean dASR (pts)",
                     "gap cells", "DER gap closed (%)", "no harm", "no harm, one-sided", "cost (+% of base)",
                     "eligible"], rows)


def first_protocol(per_block: dict, frames: dict) -> tuple[list, dict, str | None]:
    """The first protocol: pooled over its blocks and base defenses; rows, pooled figures, the selection."""
    rows, pooled = [], {}
    for r in ("development", "held-out"):
        names = [b for b in per_block if role(b) == r and b in FIRST_BLOCKS]
        for v in sorted({v for b in names for v in per_block[b]}):
            dfs = [frames[b][v] for b in names if v in frames[b]]
            if len(dfs) == len(names) and len(names) > 1:
                pooled[(r, v)], _ = figures(pd.concat(dfs, ignore_index=True))
    dev_names = [b for b in per_block if role(b) == "development" and b in FIRST_BLOCKS]
    dev = ({v: f for (r, v), f in pooled.items() if r == "development"} if len(dev_names) > 1
           else per_block.get(dev_names[0], {}) if dev_names else {})
    for (r, v), f in pooled.items():
        rows.append(row(f"pooled {r}", r, v, f))
    return rows, pooled, select(dev, FIRST_RULE, CALIBRATION_FREE)


def per_base_protocol(frames: dict) -> dict[str, dict]:
    """The per-base protocol: each base defense's development cells (every development block) alone, under
    PER_BASE_RULE; a selected variant is then checked on the fresh held-out blocks' cells of that base."""
    out: dict[str, dict] = {}
    for r, key in (("development", "development"), ("fresh held-out", "fresh")):
        pooled: dict[str, dict[str, pd.DataFrame]] = {}  # base -> variant -> frame
        for b, vs in frames.items():
            if role(b) != r:
                continue
            for v, df in vs.items():
                for base, part in by_base(df).items():
                    pooled.setdefault(base, {}).setdefault(v, []).append(part)
        for base, vs in sorted(pooled.items()):
            for v, parts in sorted(vs.items()):
                f, _ = variant_figures(pd.concat(parts, ignore_index=True))
                reasons = PER_BASE_RULE.reasons(f)
                f["eligible"] = not reasons
                if key == "development":
                    f["not_eligible_because"] = reasons
                out.setdefault(base, {"development": {}, "fresh": {}})[key][v] = f
    for base, d in out.items():
        d["selected"] = select(d["development"], PER_BASE_RULE, CALIBRATION_FREE)
        fresh = d["fresh"].get(d["selected"]) if d["selected"] else None
        d["checks"] = confirm(fresh, PER_BASE_RULE.asr_rise_limit) if fresh else None
        d["confirmed"] = bool(fresh) and confirmed(d["checks"])
    return out


def per_base_text(pb: dict[str, dict]) -> str:
    rows = []
    for base, d in pb.items():
        for v, f in d["development"].items():
            rows.append([base, v, f["pairs"], f["acc_loss_cells"], pct(f["acc_recovered_mean"]),
                         pct(f["asr_rise_on_those"], 1, True), pct(f["der_gap_closed_mean"]),
                         "ok" if f["no_harm_one_sided"] else "MISS", pct(f["cost"]),
                         "**selected**" if v == d["selected"] else "; ".join(f["not_eligible_because"]) or "eligible"])
    conf = []
    for base, d in pb.items():
        for v, f in d["fresh"].items():
            checks = d["checks"] if v == d["selected"] else None
            conf.append([base, v, f["pairs"], f["acc_loss_cells"], pct(f["acc_recovered_mean"]),
                         pct(f["asr_rise_on_those"], 1, True), f["der_gap_cells"], pct(f["der_gap_closed_mean"]),
                         "ok" if f["no_harm_one_sided"] else "MISS", pct(f["cost"]),
                         ("CONFIRMED" if d["confirmed"] else "refuted: " + ", ".join(
                             k for k, c in checks.items() if c == "MISS")) if checks else "(not selected)"])
    return ("### Per-base-defense selection (development blocks, each base alone)\n\n"
            + md_table(["base", "variant", "pairs", "lossy cells", "C-Acc recovered (%)", "mean dASR (pts)",
                        "DER gap closed (%)", "no harm, one-sided", "cost (+%)", "rule"], rows)
            + "\n\n### Per-base confirmation (fresh held-out blocks, never used to choose)\n\n"
            + (md_table(["base", "variant", "pairs", "lossy cells", "C-Acc recovered (%)", "mean dASR (pts)",
                         "gap cells", "DER gap closed (%)", "no harm, one-sided", "cost (+%)", "verdict"], conf)
               if conf else "(no fresh cells yet)"))


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
        base_path = STUDY / f"{block}.yaml"
        _, base_df, _ = run_spec(str(base_path), ro)
        if base_df.empty:
            continue
        for variant, path in variants.items():
            df = variant_frame(base_df, path, path == base_path, ro)
            if df.empty or df[Col.GIC].astype(bool).sum() == 0:
                continue
            frames.setdefault(block, {})[variant] = df
            per_block.setdefault(block, {})[variant], gaps.setdefault(block, {})[variant] = figures(df)
    rows = [row(b, role(b), v, f) for r in ROLES.values() for b in per_block if role(b) == r
            for v, f in per_block[b].items()]
    pooled_rows, pooled, chosen = first_protocol(per_block, frames)
    pb = per_base_protocol(frames)
    change_rows = []
    for b in per_block:
        for v, g in gaps[b].items():
            for (attack, defense), r in shifted_changes(g).iterrows():
                change_rows.append([b, v, attack, defense, f"{r['dacc']:+.1f}", f"{r['dasr']:+.1f}"])
    changes = md_table(["block", "variant", "victim", "defense", "mean dC-Acc on shifted sets (pts)",
                        "mean dASR on shifted sets (pts)"], change_rows)
    defaults = {base: d["selected"] for base, d in pb.items() if d["confirmed"]}
    cmd = command_line(__file__, argv)
    text = (f"## GIC placement and objectives (issue 16)\n\nmachine: {describe_machine()}; command `{cmd}`; "
            f"{dt.datetime.now():%Y-%m-%d %H:%M}\n\n" + table(rows + pooled_rows) + "\n\n"
            + ("First protocol (pooled over base defenses), selected on the development blocks: "
               f"**{chosen}**" if chosen else "First protocol (pooled over base defenses): no variant is eligible "
               "on the development blocks") + "\n\n" + per_base_text(pb) + "\n\n"
            + "Per-base defaults adopted (selected on development, confirmed on fresh held-out): "
            + (", ".join(f"{b}: **{v}**" for b, v in defaults.items()) if defaults else "none") + "\n\n"
            + "Per victim and defense, the paired change on the shifted sets (all of them, lossy or not):\n\n"
            + changes + "\n")
    summary = {"generated": dt.datetime.now().isoformat(timespec="seconds"),
               "asr_rise_limit": FIRST_RULE.asr_rise_limit,
               "selected": chosen,  # the first protocol's choice; None: no variant met the rule
               "packaged_default": chosen or "before",
               "per_base_defaults": defaults,  # base defense -> variant, confirmed on the fresh blocks
               "per_base": pb,
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
