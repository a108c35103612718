"""GIC efficacy: purification with and without Guided Input Calibration, per auxiliary-data type, against the
targets of the GIC issue (never tuned on test ASR; every number is a paired comparison over the same victims,
auxiliary draws and seeds).

Targets (gic-method.md section 1 for DER and the gap; computed by `backdoorbench_gic.analysis.efficacy`):
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
import sys
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import command_line, describe_machine, victims_table
from backdoorbench_gic.matrix import run_spec
from backdoorbench_gic.analysis.efficacy import efficacy_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


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
    text, gaps, verdict = efficacy_report(df)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = command_line(__file__, argv)
    header = (f"## GIC efficacy: `{spec.name}`\n\n"
              f"Spec `{Path(args.spec).name}`; {ran} finished cells of {len(spec.cells())}{baseline}; "
              f"machine: {describe_machine()}; "
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
