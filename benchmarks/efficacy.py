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
    python benchmarks/efficacy.py --spec B.yaml --variant bn-after     # a named GIC variant of B against B's uncalibrated cells
    python benchmarks/efficacy.py --spec V.yaml --baseline_spec B.yaml  # a GIC-only spec against B's uncalibrated cells

It makes the Fashion-MNIST split when missing (the spec's attacks generate their victims), runs the matrix
(resumable: a rerun skips finished cells), writes the matrix report under <output_root>/report/ and the analysis
to benchmarks/results/efficacy_<name>.md and .csv.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import command_line, describe_machine, victims_table
from backdoorbench_gic.analysis.efficacy import efficacy_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def paired_with(spec, base, what: str):
    """``base``, whose uncalibrated cells pair with ``spec``'s calibrated ones; refused (before anything runs) unless
    every calibrated cell has a twin there that differs from it in GIC alone
    (:func:`~backdoorbench_gic.matrix.spec.pairing_problems`)."""
    from backdoorbench_gic.matrix.spec import pairing_problems

    problems = pairing_problems(spec, base)
    if problems:
        raise SystemExit(f"{what}: the uncalibrated cells of {base.path or base.name} would not pair with "
                         f"{spec.path or spec.name}'s calibrated ones: " + "; ".join(problems[:3])
                         + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    return base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(HERE / "efficacy.yaml"))
    p.add_argument("--report_only", action="store_true", help="analyse the finished cells; run nothing")
    p.add_argument("--workers", type=int, default=None, help="override the spec's local worker count")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--variant", default=None,
                   help="report this named GIC variant of the spec (its own matrix) against the spec's uncalibrated cells")
    p.add_argument("--baseline_spec", default=None,
                   help="take the uncalibrated cells from this finished spec's run (for a spec with gic: [true])")
    args = p.parse_args(argv)

    from backdoorbench_gic.analysis import ensure_splits
    from backdoorbench_gic.matrix import collect_results, load_spec, run_matrix, write_report
    from backdoorbench_gic.matrix.spec import DEFAULT, OFF, uncalibrated_source
    from backdoorbench_gic.utils.io import atomic_write_text
    from backdoorbench_gic.utils.logs import console_logging

    console_logging()
    spec = load_spec(args.spec)
    base = None  # checked before anything runs
    if args.variant:
        if args.baseline_spec or args.variant in (OFF, DEFAULT):
            raise SystemExit("--variant names a variant other than off and default (those are the spec's own cells, "
                             "reported without it) and pairs with the spec's uncalibrated cells (no --baseline_spec)")
        base = paired_with(spec, uncalibrated_source(spec), f"--variant {args.variant}")
        spec = spec.part(args.variant)
    else:
        if not set(spec.variants) & {OFF, DEFAULT}:
            raise SystemExit(f"{args.spec} runs only the GIC variants {', '.join(spec.variants)}: name one with --variant")
        spec = spec.parts()[0]  # off and default; named variants are reported with --variant
        if args.baseline_spec:
            if OFF in spec.variants:
                raise SystemExit(f"--baseline_spec pairs a spec that runs only calibrated cells; {args.spec} runs its own")
            base = paired_with(spec, load_spec(args.baseline_spec), f"--baseline_spec {args.baseline_spec}")
    t0 = time.time()
    if not args.report_only:
        ensure_splits(spec)
        print(f"matrix: {run_matrix(spec, {'workers': args.workers} if args.workers else None).counts}")
    wall = time.time() - t0
    df = collect_results(spec.output_root)
    if df.empty:
        print("no finished cells", file=sys.stderr)
        return 1
    write_report(spec.output_root)
    baseline, ran = "", len(df)
    if base is not None:
        off = collect_results(base.output_root)
        off = off[~off["gic"].astype(bool)]
        df = pd.concat([off, df], ignore_index=True)
        baseline = f"; uncalibrated cells: {len(off)} from `{Path(base.path).name}`'s run"
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
