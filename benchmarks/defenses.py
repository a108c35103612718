"""The purification defenses on BadNets and Blended victims with in-distribution and shifted auxiliary data: C-Acc,
ASR, RA, DER and wall time (benchmarks/defenses*.yaml); for FP and ANP also where the auxiliary-only choice of the
pruning amount lands against the test-ASR ("oracle") choice BackdoorBench makes.

Targets: on in-distribution data (`reserved`; `train` for full-data victims) FT-SAM, FST and SAU (defenses.yaml) and
NAD, FP, ANP and NPD (defenses_all_5pct.yaml) bring BadNets' ASR below 0.10 with a C-Acc drop under 5 points; CLP,
which uses no data, is the data-free reference.

    python benchmarks/defenses.py --spec benchmarks/defenses_all_5pct.yaml benchmarks/defenses_all_5pct_shift.yaml
    python benchmarks/defenses.py --spec ... --report_only
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import describe_machine as machine, md_table, run_spec, victims_table
from backdoorbench_gic.analysis.keys import extra_column

HERE = Path(__file__).resolve().parent

ORDER = ["ft", "ft-sam", "fst", "sau", "i-bau", "nad", "fp", "anp", "npd", "clp"]
MUST_PASS = ("ft-sam", "fst", "sau", "nad", "fp", "anp", "npd")
REFERENCE = ("clp",)
PRUNING = {"fp": "prune_ratio", "anp": "pruning_amount"}  # the extra holding the auxiliary-only choice


def selection_rows(spec, df: pd.DataFrame) -> list[list[str]]:
    """FP's and ANP's pruning amount chosen on the auxiliary set versus the test-ASR oracle, per cell.

    Each cell's plan is rebuilt exactly (same victim, auxiliary draw and seed, so the same held-out split, ranking
    or masks); every candidate amount is applied to the victim and evaluated on the cell's test sets; the oracle is
    the candidate with the lowest test ASR among those keeping test C-Acc within the defense's acc_ratio of the
    victim's (:func:`~backdoorbench_gic.defenses._pruning.oracle_index`). FP is then fine-tuned at the oracle
    amount as well; ANP does not fine-tune, so its pruned model is final.
    """
    import torch

    from backdoorbench_gic.auxdata import build_aux_set
    from backdoorbench_gic.data.transforms import TrainAugment
    from backdoorbench_gic.defenses._pruning import oracle_index
    from backdoorbench_gic.evaluation import evaluate
    from backdoorbench_gic.pipeline import eval_sets
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.registry import DEFENSES
    from backdoorbench_gic.utils.runtime import seed_everything

    cpu = torch.device("cpu")
    rows = []
    cells = df[df["defense"].isin(list(PRUNING))].sort_values(["attack", "aux_type", "defense"])
    for r in cells.itertuples():
        record = load_attack_record(spec.bb_root / "record" / r.attack, spec.bb_root)
        req = spec.cell_of(r._asdict()).request(spec)  # the cell's own run: entry, defaults, seed, aux type and size
        overrides = {**req.overrides, "device": "cpu"}
        d = DEFENSES.get(req.defense).from_sources(record.clean_data, None, overrides)
        seed_everything(d.config.random_seed)
        victim = record.build_model().eval()
        clean_test, bd_test = eval_sets(record, spec.eval_limit)
        aux = build_aux_set(record, r.aux_type, ratio=None if req.n_per_class else d.config.ratio,
                            n_per_class=req.n_per_class, seed=d.config.random_seed, victim=victim, device=cpu,
                            options=req.aux_options)
        plan = d.plan(d.start(victim, aux, device=cpu, progress=False))
        curve = []
        for amount in plan.candidates:
            curve.append(evaluate(d.pruned_copy(victim, plan, amount, cpu), clean_test, bd_test))
        o = oracle_index([m.acc for m in curve], [m.asr for m in curve], d.config.acc_ratio)
        a = plan.candidates.index(plan.chosen)
        if r.defense == "fp":
            n = len(plan.ranking)
            shown = lambda k: f"{k / n * 100:.0f} % ({k}/{n})"  # noqa: E731
            tuned = DEFENSES.get("fp").from_sources(record.clean_data, None, {**overrides, "prune_ratio": plan.candidates[o] / n})
            res = tuned.purify(victim, aux, device=cpu, train_augment=TrainAugment.for_spec(record.spec), progress=False)
            final_oracle = evaluate(res.model, clean_test, bd_test)
            recorded = getattr(r, extra_column(PRUNING["fp"])) * n
        else:
            shown = lambda t: f"mask < {t:.2f}"  # noqa: E731
            final_oracle = curve[o]
            recorded = getattr(r, extra_column(PRUNING["anp"]))
        assert abs(recorded - plan.chosen) < 1e-6, f"{r.defense} on {r.attack}/{r.aux_type}: the plan did not replay"
        pct = lambda m: f"{m.acc * 100:.1f} / {m.asr * 100:.1f}"  # noqa: E731
        rows.append([r.attack, r.aux_type, r.defense, shown(plan.chosen), shown(plan.candidates[o]), pct(curve[a]),
                     pct(curve[o]), f"{r.acc_after * 100:.1f} / {r.asr_after * 100:.1f}", pct(final_oracle)])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", nargs="+", default=[str(HERE / "defenses.yaml")],
                   help="one or more specs, reported together under the first one's name")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    from backdoorbench_gic.matrix import write_report
    from backdoorbench_gic.utils.io import atomic_write_text
    from backdoorbench_gic.utils.logs import console_logging

    console_logging()
    runs = [run_spec(path, args.report_only) for path in args.spec]
    spec, wall = runs[0][0], sum(w for _, _, w in runs)
    df = pd.concat([d.assign(_spec=i) for i, (_, d, _) in enumerate(runs) if not d.empty], ignore_index=True) \
        if any(not d.empty for _, d, _ in runs) else pd.DataFrame()
    if df.empty:
        print("no finished cells", file=sys.stderr)
        return 1
    for s, _, _ in runs:
        write_report(s.output_root)
    order = {d: i for i, d in enumerate(ORDER)}
    df = df.assign(_o=df["defense"].map(order)).sort_values(["attack", "aux_type", "_o"])
    rows, verdicts = [], []
    for r in df.itertuples():
        drop = r.acc_before - r.acc_after
        ok = r.asr_after < 0.10 and drop < 0.05
        rows.append([r.attack, r.aux_type, r.defense, r.aux_size, f"{r.acc_after * 100:.2f}", f"{r.asr_after * 100:.2f}",
                     f"{r.ra_after * 100:.2f}", f"{r.der:.3f}", f"{drop * 100:+.2f}", f"{r.defense_seconds:.0f}",
                     f"{r.wall_seconds:.0f}", "reference" if r.defense in REFERENCE else "success" if ok else "-"])
        if r.aux_type in ("reserved", "train") and "badnet" in r.attack and r.defense in MUST_PASS:
            verdicts.append(f"{r.defense}: ASR {r.asr_after * 100:.2f} %, C-Acc drop {drop * 100:.2f} pts -> "
                            + ("ok" if ok else "MISS"))
    cmd = "python benchmarks/defenses.py " + " ".join(sys.argv[1:])
    text = (f"## Purification defenses: `{spec.name}`\n\nMachine: {machine()}; command `{cmd.strip()}`; "
            f"{dt.datetime.now():%Y-%m-%d %H:%M}" + ("" if args.report_only else f"; ran {wall / 60:.1f} min")
            + (f"; {spec.eval_limit} test images" if spec.eval_limit else "; full clean and poisoned test sets")
            + ". Success = ASR < 10 % and C-Acc drop < 5 points.\n\nVictims:\n\n" + victims_table(df) + "\n\n"
            + md_table(["victim", "aux", "defense", "aux images", "C-Acc", "ASR", "RA", "DER", "C-Acc drop (pts)",
                        "defense s", "cell wall s", "purified?"], rows)
            + "\n\nTarget (BadNets, in-distribution aux): " + "; ".join(verdicts) + "\n")
    if df["defense"].isin(list(PRUNING)).any():
        text += ("\n### Pruning amount: auxiliary-only choice versus the test-ASR oracle\n\n"
                 "Ours: on a held-out 20 % of the auxiliary set, FP prunes until the accuracy first falls below "
                 "(1 - acc_ratio) x the unpruned model's, ANP takes the largest mask threshold within that bound. Oracle (BackdoorBench looks at test ASR): the lowest test ASR among "
                 "candidates keeping test C-Acc within the same acc_ratio. Pruned = before fine-tuning; C-Acc / ASR "
                 "in %.\n\n"
                 + md_table(["victim", "aux", "defense", "ours", "oracle", "pruned, ours", "pruned, oracle",
                             "final, ours", "final, oracle"],
                          [row for i, (s, _, _) in enumerate(runs) for row in selection_rows(s, df[df["_spec"] == i])])
                 + "\n")
    name = f"defenses_{spec.name}"
    atomic_write_text(Path(args.out) / f"{name}.md", text)
    df.drop(columns=["_o", "_spec"]).to_csv(Path(args.out) / f"{name}.csv", index=False)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
