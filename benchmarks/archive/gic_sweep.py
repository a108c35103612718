"""FROZEN (2026-11-25 result; not maintained): superseded by benchmarks/gic16.py, which runs the sweep's candidate (the
generator family) and GIC's placements on every block with a written selection rule. Kept to reproduce BENCHMARKS.md's
archived sweep table.

GIC design-space sweep: calibrator family x objective x budget delta, one factor at a time around the
default, each in front of the same FT (benchmarks/gic_sweep.yaml). Reports, per configuration, the label-free
signals a user could choose on (BatchNorm-statistics divergence of g(aux), the drift monitor, fit time) and,
beside them, the test outcome against the efficacy run's uncalibrated FT cells on the same victims, draws and
seeds. The default is picked on the label-free columns; the test columns only show what that choice costs.

    python benchmarks/archive/gic_sweep.py                  # runs the sweep matrix (resumable), then analyses
    python benchmarks/archive/gic_sweep.py --report_only
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import Col, describe_machine, md_table, run_spec

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent


def analyse(sweep: pd.DataFrame, base: pd.DataFrame, order: list[str] | None = None) -> str:
    keys = ["attack", "aux_type", "aux_size_label", "seed"]
    ref = base[(~base["gic"]) & (base["base_defense"] == "ft")].set_index(keys)[["acc_after", "asr_after", "der"]]
    s = sweep.join(ref.add_suffix("_nogic"), on=keys)
    for c in ("acc_after", "asr_after", "der"):
        s[f"d_{c}"] = s[c] - s[f"{c}_nogic"]
    s["shifted"] = s["aux_type"] != "reserved"
    rows = []
    order = [o for o in (order or []) if o in set(sweep["defense_label"])] or list(dict.fromkeys(sweep["defense_label"]))
    for label in order:
        g = s[s["defense_label"] == label]
        sh, res = g[g["shifted"]], g[~g["shifted"]]
        rows.append([label, len(g),
                     f"{sh[Col.BN_DIV_BEFORE].mean():.3f} -> {sh[Col.BN_DIV_AFTER].mean():.3f}",
                     f"{sh[Col.DRIFT_RATIO].mean():.2f}", f"{g[Col.DRIFT_FLAG].mean() * 100:.0f} %",
                     f"{g[Col.GIC_SECONDS].mean():.1f}",
                     f"{sh['d_acc_after'].mean() * 100:+.2f}", f"{sh['d_asr_after'].mean() * 100:+.2f}",
                     f"{sh['d_der'].mean():+.4f}", f"{res['d_acc_after'].mean() * 100:+.2f}",
                     f"{res['d_der'].mean():+.4f}"])
    table = md_table(["configuration", "cells", "D_BN shifted aux -> g(aux)", "drift ratio", "drift flagged",
                      "fit s", "dC-Acc shifted (pts)", "dASR shifted (pts)", "dDER shifted", "dC-Acc reserved (pts)",
                      "dDER reserved"], rows)
    per_aux = []
    for (label, aux), g in sorted(s.groupby(["defense_label", "aux_type"]), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        per_aux.append([label, aux, f"{g[Col.BN_DIV_AFTER].mean():.3f}", f"{g['d_acc_after'].mean() * 100:+.2f}",
                        f"{g['d_asr_after'].mean() * 100:+.2f}", f"{g['d_der'].mean():+.4f}"])
    detail = md_table(["configuration", "aux", "D_BN g(aux)", "dC-Acc (pts)", "dASR (pts)", "dDER"], per_aux)
    return table + "\n\nPer auxiliary type:\n\n" + detail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(HERE / "gic_sweep.yaml"))
    p.add_argument("--baseline_spec", default=str(BENCH / "efficacy.yaml"), help="where the uncalibrated FT cells are")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--out", default=str(BENCH / "results"))
    args = p.parse_args(argv)

    from backdoorbench_gic.utils.io import atomic_write_text
    from backdoorbench_gic.utils.logs import console_logging

    console_logging()
    spec, sweep, wall = run_spec(args.spec, args.report_only)
    _, base, _ = run_spec(args.baseline_spec, report_only=True)
    if sweep.empty or base.empty:
        print("the sweep or its baseline has no finished cells: run both first", file=sys.stderr)
        return 1
    text = analyse(sweep, base, [d.shown for d in spec.defenses])
    cmd = "python benchmarks/archive/gic_sweep.py " + " ".join(sys.argv[1:])
    header = (f"## GIC design-space sweep: `{spec.name}`\n\n{len(sweep)} cells; machine: {describe_machine()}; command "
              f"`{cmd.strip()}`; {dt.datetime.now():%Y-%m-%d %H:%M}"
              + ("" if args.report_only else f"; ran {wall / 60:.1f} min")
              + ". d = with this GIC minus uncalibrated FT on the same victim, draw and seed (efficacy run). "
                "Shifted = reserved_gaussian_blur, reserved_rotation, reserved_noise.")
    out = Path(args.out)
    atomic_write_text(out / f"gic_sweep_{spec.name}.md", header + "\n\n" + text + "\n")
    print(header + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
