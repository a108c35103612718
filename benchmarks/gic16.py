"""Issue 16: where calibration pays. Runs (or, with --report_only, reads) the blocks and GIC variants of
`benchmarks/gic16/`, pairs each variant with its block's uncalibrated cells, applies the two protocols written in
BENCHMARKS.md before their confirmation results, and reports development and held-out blocks apart.

A block is a spec with uncalibrated cells (`off`) and a `role`; its variants are its `gic:` axis and those of the
files inheriting from it (`_base_`); the study's structure and both protocols are
`backdoorbench_gic.analysis.protocols`, the rules `backdoorbench_gic.analysis.selection`.

    python benchmarks/gic16.py                  # run every block and variant (resumable), then report
    python benchmarks/gic16.py --report_only    # analyse what has finished
    python benchmarks/gic16.py --only dev       # only the blocks whose name starts with dev (the selection's view)

Outputs: benchmarks/results/gic16.md and efficacy_summary.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import command_line, describe_machine, md_table, percent
from backdoorbench_gic.analysis.protocols import FIRST_RULE, first_protocol, per_base_protocol, rule_figures, shifted_changes
from backdoorbench_gic.matrix import run_spec
from backdoorbench_gic.matrix.study import study_blocks, study_frames

HERE = Path(__file__).resolve().parent
STUDY = HERE / "gic16"
# the blocks each protocol was written for (BENCHMARKS.md): the first reads these development and held-out blocks;
# the per-base one selects on every development block and confirms on the fresh ones, never used before it
FIRST_BLOCKS = ("dev", "dev_sau", "dev_wanet-sig", "heldout", "heldout_sau", "heldout_wanet-sig")
FRESH_BLOCKS = ("fresh_sau", "fresh_wanet-sig_sau")
SHOWN = ("development", "held-out", "fresh held-out", "PreActResNet-18 confirmation")  # the report's roles, in order


def shown_role(block) -> str:
    return ("fresh held-out" if block.name in FRESH_BLOCKS else
            "PreActResNet-18 confirmation" if block.role == "confirmation" else block.role)


def ok(flag) -> str:
    return "ok" if flag else "MISS"


def row(name: str, r: str, v: str, f: dict) -> list:
    return [name, r, v, f["pairs"], f["acc_loss_cells"], percent(f["acc_recovered_mean"]),
            percent(f["asr_rise_on_those"], 1, True), f["der_gap_cells"], percent(f["der_gap_closed_mean"]),
            ok(f["no_harm"]), ok(f["no_harm_one_sided"]), percent(f["cost"]), "yes" if f["eligible"] else "no"]


def per_base_text(pb: dict[str, dict]) -> str:
    rows = [[base, v, f["pairs"], f["acc_loss_cells"], percent(f["acc_recovered_mean"]),
             percent(f["asr_rise_on_those"], 1, True), percent(f["der_gap_closed_mean"]), ok(f["no_harm_one_sided"]),
             percent(f["cost"]), "**selected**" if v == d["selected"] else "; ".join(f["not_eligible_because"]) or "eligible"]
            for base, d in pb.items() for v, f in d["development"].items()]
    conf = []
    for base, d in pb.items():
        for v, f in d["fresh"].items():
            checks = d["checks"] if v == d["selected"] else None
            conf.append([base, v, f["pairs"], f["acc_loss_cells"], percent(f["acc_recovered_mean"]),
                         percent(f["asr_rise_on_those"], 1, True), f["der_gap_cells"], percent(f["der_gap_closed_mean"]),
                         ok(f["no_harm_one_sided"]), percent(f["cost"]),
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
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    os.environ.setdefault("BBGIC_PURIFY_CACHE", "1")

    from backdoorbench_gic.utils.io import atomic_write_text, update_json
    from backdoorbench_gic.utils.logs import console_logging

    console_logging()
    blocks = {n: b for n, b in study_blocks(sorted(STUDY.glob("*.yaml"))).items() if n.startswith(args.only)}
    if not args.report_only:
        for path in sorted({b.path for b in blocks.values()} | {f for b in blocks.values() for f in b.files.values()}):
            run_spec(str(path), False)  # every part of the file, resumable
    frames = study_frames(blocks)
    figs: dict[str, dict[str, dict]] = {}
    gaps: dict[str, dict[str, pd.DataFrame]] = {}  # each variant's per-cell gaps, from the report its figures came from
    for name, vs in frames.items():
        for v, frame in vs.items():
            figs.setdefault(name, {})[v], gaps.setdefault(name, {})[v] = rule_figures(frame)
    role = {n: shown_role(blocks[n]) for n in frames}
    rows = [row(b, r, v, f) for r in SHOWN for b in figs if role[b] == r for v, f in figs[b].items()]
    dev = [b for b in frames if role[b] == "development" and b in FIRST_BLOCKS]
    pooled, chosen = first_protocol(frames, dev, [b for b in frames if role[b] == "held-out" and b in FIRST_BLOCKS])
    rows += [row(f"pooled {r}", r, v, f) for (r, v), f in pooled.items()]
    pb = per_base_protocol(frames, [b for b in frames if role[b] == "development"], [b for b in frames if b in FRESH_BLOCKS])
    changes = md_table(["block", "variant", "victim", "defense", "mean dC-Acc on shifted sets (pts)",
                        "mean dASR on shifted sets (pts)"],
                       [[b, v, attack, defense, f"{r['dacc']:+.1f}", f"{r['dasr']:+.1f}"]
                        for b in figs for v, g in gaps[b].items() for (attack, defense), r in shifted_changes(g).iterrows()])
    defaults = {base: d["selected"] for base, d in pb.items() if d["confirmed"]}
    text = (f"## GIC placement and objectives (issue 16)\n\nmachine: {describe_machine()}; command "
            f"`{command_line(__file__, argv)}`; {dt.datetime.now():%Y-%m-%d %H:%M}\n\n"
            + md_table(["block", "role", "variant", "pairs", "lossy cells", "C-Acc recovered (%)", "mean dASR (pts)",
                        "gap cells", "DER gap closed (%)", "no harm", "no harm, one-sided", "cost (+% of base)",
                        "eligible"], rows) + "\n\n"
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
               "blocks": [{"block": b, "role": role[b], "variant": v,
                           "spec": str(blocks[b].files[v].relative_to(HERE.parent)), **f}
                          for b in figs for v, f in figs[b].items()],
               "pooled": [{"role": r, "variant": v, **f} for (r, v), f in pooled.items()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gic16.md", text)
    update_json(out / "efficacy_summary.json", summary)  # other studies' keys (issue23: gic23.py) are kept
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
