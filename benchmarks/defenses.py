"""The five purification defenses (FT, FT-SAM, FST, SAU, i-BAU) on BadNets and Blended victims with
in-distribution and noise-shifted auxiliary data: C-Acc, ASR, RA, DER and wall time (benchmarks/defenses.yaml).

Target (defense issue): on in-distribution data (`reserved`; `train` for these full-data victims), at least FT-SAM, FST and SAU bring BadNets' ASR below 0.10 with a C-Acc
drop under 5 points.

    python benchmarks/defenses.py                 # generates the victims when missing, runs, writes the table
    python benchmarks/defenses.py --report_only
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from backdoorbench_gic.analysis import describe_machine as machine, md_table, run_spec, victims_table

HERE = Path(__file__).resolve().parent

MUST_PASS = ("ft-sam", "fst", "sau")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(HERE / "defenses.yaml"))
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    from backdoorbench_gic.matrix import write_report
    from backdoorbench_gic.utils.io import atomic_write_text
    from backdoorbench_gic.utils.logs import console_logging

    console_logging()
    spec, df, wall = run_spec(args.spec, args.report_only)
    if df.empty:
        print("no finished cells", file=sys.stderr)
        return 1
    write_report(spec.output_root)
    order = {d: i for i, d in enumerate(["ft", "ft-sam", "fst", "sau", "i-bau"])}
    df = df.assign(_o=df["defense"].map(order)).sort_values(["attack", "aux_type", "_o"])
    rows, verdicts = [], []
    for r in df.itertuples():
        drop = r.acc_before - r.acc_after
        ok = r.asr_after < 0.10 and drop < 0.05
        rows.append([r.attack, r.aux_type, r.defense, r.aux_size, f"{r.acc_after * 100:.2f}", f"{r.asr_after * 100:.2f}",
                     f"{r.ra_after * 100:.2f}", f"{r.der:.3f}", f"{drop * 100:+.2f}", f"{r.defense_seconds:.0f}",
                     f"{r.wall_seconds:.0f}", "success" if ok else "-"])
        if r.aux_type in ("reserved", "train") and "badnet" in r.attack and r.defense in MUST_PASS:
            verdicts.append(f"{r.defense}: ASR {r.asr_after * 100:.2f} %, C-Acc drop {drop * 100:.2f} pts -> "
                            + ("ok" if ok else "MISS"))
    cmd = "python benchmarks/defenses.py " + " ".join(sys.argv[1:])
    text = (f"## Purification defenses: `{spec.name}`\n\nMachine: {machine()}; command `{cmd.strip()}`; "
            f"{dt.datetime.now():%Y-%m-%d %H:%M}" + ("" if args.report_only else f"; ran {wall / 60:.1f} min")
            + "; full clean and poisoned test sets. Success = ASR < 10 % and C-Acc drop < 5 points.\n\nVictims:\n\n"
            + victims_table(df) + "\n\n"
            + md_table(["victim", "aux", "defense", "aux images", "C-Acc", "ASR", "RA", "DER", "C-Acc drop (pts)",
                        "defense s", "cell wall s", "purified?"], rows)
            + "\n\nTarget (BadNets, in-distribution aux): " + "; ".join(verdicts) + "\n")
    atomic_write_text(Path(args.out) / f"defenses_{spec.name}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
