"""Issue 23: GIC on auxiliary data of the victim's classes from another source, and on mixtures of sources. Runs (or,
with --report_only, reads) the blocks of `benchmarks/gic23/` and applies the rules that `benchmarks/gic23/PROTOCOL.md`
fixed before their results were read: stage 1 chooses the calibrator on the development block, stage 2 (when its
variant ran) shared against per-source calibration on the mix, and the confirmation block checks the packaged
default and the adopted variant against the issue's targets on sets never used for choosing. Development and
confirmation are reported apart.

    python benchmarks/gic23.py                  # run every block and variant (resumable), then report
    python benchmarks/gic23.py --report_only    # analyse what has finished
    python benchmarks/gic23.py --only dev       # the development block alone (what the choice may see)

Outputs: benchmarks/results/gic23.md, gic23.json, and the key issue23 of efficacy_summary.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import Col, command_line, describe_machine, md_table, percent
from backdoorbench_gic.analysis.compare import IN_DISTRIBUTION
from backdoorbench_gic.analysis.protocols import PER_BASE_RULE
from backdoorbench_gic.analysis.selection import by_base, confirm, select, variant_figures
from backdoorbench_gic.matrix import run_spec
from backdoorbench_gic.matrix.study import study_blocks, study_frames

HERE = Path(__file__).resolve().parent
STUDY = HERE / "gic23"
# PROTOCOL.md's stage-1 rule is the per-base protocol's rule, pooled over the base defenses
STAGE1_RULE = PER_BASE_RULE
PER_SOURCE = "per_source"  # stage 2's variants end with this
CONFIRMING = ("confirm", "confirm_preact")  # the blocks the targets are checked on (the second read by no rule)
SUCCESS_MARGIN = 0.10  # the confirmation's success-rate target: with GIC >= without + 10 points
# the targets PROTOCOL.md names (selection.confirm also reports the cost, which this protocol does not judge)
TARGETS = ("lossy cells", "C-Acc recovered", "mean ASR change", "success rate", "DER gap closed", "no harm")


def figure_row(what: list, f: dict) -> list:
    return what + [f["pairs"], f["acc_loss_cells"], percent(f["acc_recovered_mean"]), percent(f["asr_rise_on_those"], 1, True),
                   f["der_gap_cells"], percent(f["der_gap_closed_mean"]), "ok" if f["no_harm_one_sided"] else "MISS",
                   f"{percent(f['lossy_success_rate_nogic'])} -> {percent(f['lossy_success_rate_gic'])} "
                   f"(+{f['lossy_success_gained']} / -{f['lossy_success_lost']})", percent(f["cost"])]


FIGURE_HEADER = ["pairs", "lossy cells", "C-Acc recovered (%)", "mean dASR on them (pts)", "gap cells",
                 "DER gap closed (%)", "no harm, one-sided", "success on lossy runs (%): off -> GIC (gained / lost)",
                 "cost (+% of base)"]


def verdict_text(checks: dict[str, str]) -> str:
    missed = [k for k, c in checks.items() if c == "MISS" and k.startswith(TARGETS)]
    return "all targets met" if not missed else "missed: " + ", ".join(missed)


def breakdown(frame: pd.DataFrame) -> list[tuple[str, str, dict]]:
    """A variant's figures per shifted set and per base defense (each shifted set read against ``reserved``)."""
    out = []
    ref = frame[frame[Col.AUX_TYPE].isin(IN_DISTRIBUTION)]
    for aux in sorted(set(frame[Col.AUX_TYPE]) - set(IN_DISTRIBUTION)):
        out.append(("set", aux, variant_figures(pd.concat([ref, frame[frame[Col.AUX_TYPE] == aux]],
                                                          ignore_index=True))[0]))
    out += [("base defense", base, variant_figures(part)[0]) for base, part in by_base(frame).items()]
    return out


def cost_of_sources(frame: pd.DataFrame) -> str:
    """Mean C-Acc and ASR after purification, per base defense and set, uncalibrated (what each source costs)."""
    off = frame[~frame[Col.GIC].astype(bool)]
    g = off.groupby([Col.BASE_DEFENSE, Col.AUX_TYPE])[[Col.ACC_AFTER, Col.ASR_AFTER]].mean()
    sets = list(dict.fromkeys(["reserved"] + sorted(set(off[Col.AUX_TYPE]) - {"reserved"})))
    rows = [[base] + [f"{g.loc[(base, s), Col.ACC_AFTER] * 100:.1f} / {g.loc[(base, s), Col.ASR_AFTER] * 100:.1f}"
                      if (base, s) in g.index else "-" for s in sets] for base in sorted(set(off[Col.BASE_DEFENSE]))]
    return md_table(["base defense"] + [f"{s}: C-Acc / ASR (%)" for s in sets], rows)


def stage2(frames: dict[str, pd.DataFrame], shared: str) -> dict | None:
    """Shared against per-source calibration on the mix's cells (PROTOCOL.md stage 2), when the per-source twin of
    ``shared`` ran: adopted if it recovers more C-Acc on the mix's lossy cells with a mean ASR change <= +1 point."""
    twin = next((v for v in frames if v.endswith(PER_SOURCE)), None)
    if twin is None or shared not in frames:
        return None
    mixes = [a for a in set(frames[twin][Col.AUX_TYPE]) if str(a).startswith("mix:")]

    def on_mix(df: pd.DataFrame) -> dict:
        return variant_figures(df[df[Col.AUX_TYPE].isin(list(IN_DISTRIBUTION) + mixes)].reset_index(drop=True))[0]

    a, b = on_mix(frames[shared]), on_mix(frames[twin])
    adopt = (b["acc_recovered_mean"] is not None and (a["acc_recovered_mean"] is None
                                                      or b["acc_recovered_mean"] > a["acc_recovered_mean"])
             and b["asr_rise_on_those"] is not None and b["asr_rise_on_those"] <= STAGE1_RULE.asr_rise_limit)
    return {"shared": shared, "per_source": twin, "figures": {shared: a, twin: b}, "adopted": adopt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--only", default="", help="run and report only the blocks whose name starts with this")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    os.environ.setdefault("BBGIC_PURIFY_CACHE", "1")

    from backdoorbench_gic.utils.io import atomic_write_text, update_json
    from backdoorbench_gic.utils.logs import console_logging

    console_logging()
    files = [f for f in sorted(STUDY.glob("*.yaml")) if f.name != "tune.yaml" and not f.name.startswith("dev_sau")]
    blocks = {n: b for n, b in study_blocks(files).items() if n.startswith(args.only)}
    if not args.report_only:
        for path in sorted({b.path for b in blocks.values()} | {f for b in blocks.values() for f in b.files.values()}):
            run_spec(str(path), False)
    frames = study_frames(blocks)
    figs = {block: {v: variant_figures(f)[0] for v, f in vs.items()} for block, vs in frames.items()}
    for vs in figs.values():
        for f in vs.values():
            f["eligible"] = STAGE1_RULE.eligible(f)
    by = {block: {v: breakdown(f) for v, f in vs.items()} for block, vs in frames.items()}
    chosen = select({v: f for v, f in figs.get("dev", {}).items() if not v.endswith(PER_SOURCE)}, STAGE1_RULE)
    s2 = stage2(frames.get("dev", {}), chosen) if chosen else None
    adopted = (s2["per_source"] if s2 and s2["adopted"] else chosen)
    checks = {block: {v: confirm(f, STAGE1_RULE.asr_rise_limit, success_margin=SUCCESS_MARGIN)
                      for v, f in figs.get(block, {}).items()} for block in CONFIRMING}
    verdicts = {v: "MISS" not in [c for k, c in ch.items() if k.startswith(TARGETS)]
                for v, ch in checks["confirm"].items()}

    parts = [f"## GIC on same-class external sources (issue 23)\n\nmachine: {describe_machine()}; command "
             f"`{command_line(__file__, argv)}`; {dt.datetime.now():%Y-%m-%d %H:%M}; protocol "
             "`benchmarks/gic23/PROTOCOL.md`\n"]
    for block, role in (("dev", "development (the only cells anything was chosen on)"),
                        ("confirm", "confirmation (fixed in advance, never used for choosing)"),
                        ("confirm_preact", "PreActResNet-18 confirmation victim (seed 0, 5 %; read by no rule)")):
        if block not in frames:
            parts.append(f"### {role[0].upper() + role[1:]}\n\n(no finished cells yet)\n")
            continue
        rows = [figure_row([v, "**chosen**" if block == "dev" and v == chosen else
                            ("eligible" if f["eligible"] else "; ".join(STAGE1_RULE.reasons(f)))
                            if block == "dev" else verdict_text(checks[block][v])], f)
                for v, f in figs[block].items()]
        parts.append(f"### {role[0].upper() + role[1:]}\n\n"
                     + md_table(["variant", "stage-1 rule" if block == "dev" else "targets"] + FIGURE_HEADER, rows))
        parts.append("Per shifted set and per base defense:\n\n" + md_table(
            ["variant", "by", "which"] + FIGURE_HEADER,
            [figure_row([v, kind, which], f) for v, rows in by[block].items() for kind, which, f in rows]))
        any_frame = next(iter(frames[block].values()))
        parts.append("What each source costs the uncalibrated purification (mean over victims, sizes, seeds):\n\n"
                     + cost_of_sources(any_frame))
        if block == "dev":
            parts.append("Stage 1 chose: " + (f"**{chosen}**" if chosen else "nothing (no variant eligible); the "
                                              "confirmation runs the packaged default") + ". Stage 2: "
                         + ("not run" if s2 is None else
                            f"{s2['per_source']} {'adopted' if s2['adopted'] else 'not adopted'} against {chosen}"))
        else:
            got = checks[block]
            parts.append("Targets per variant:\n\n" + md_table(
                ["variant"] + list(next(iter(got.values()))), [[v] + list(ch.values()) for v, ch in got.items()]))
    text = "\n\n".join(parts) + "\n"
    summary = {"generated": dt.datetime.now().isoformat(timespec="seconds"), "stage1_rule": dataclasses.asdict(STAGE1_RULE),
               "chosen": chosen, "stage2": s2, "adopted": adopted, "success_margin": SUCCESS_MARGIN,
               "confirmation_checks": checks["confirm"], "confirmed": verdicts, "preact_checks": checks["confirm_preact"],
               "blocks": [{"block": b, "role": blocks[b].role, "variant": v,
                           "spec": str(blocks[b].files[v].relative_to(HERE.parent)), **f,
                           "by": [{"by": kind, "which": which, **g} for kind, which, g in by[b][v]]}
                          for b in figs for v, f in figs[b].items()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gic23.md", text)
    atomic_write_text(out / "gic23.json", json.dumps(summary, indent=1, default=float) + "\n")
    # the efficacy summary of every study carries this one's blocks (per block, role and variant, success rates
    # included) under its own key; gic16.py's keys stay as they are
    update_json(out / "efficacy_summary.json",
                {"issue23": {k: summary[k] for k in ("generated", "chosen", "adopted", "confirmed", "blocks")}})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
