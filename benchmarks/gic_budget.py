"""How much fitting does a calibrator need? A label-free study of GIC's fit budget (steps x batch size).

GIC's fit was 100 steps of 128 images with early stopping after 25 steps without improvement (the packaged default
until 2026-11-28, kept here as the *reference*): +36 % of our CPU fine-tuning's wall time at the 5 % size, against a
target of +25 %. This measures what cheaper fits lose, with nothing but the auxiliary data and the frozen victim:
for every auxiliary draw of an efficacy spec it fits the packaged calibrator (prompt, L-inf 16/255, BN objective) at
each budget (patience off, so a budget is exactly steps x batch image passes) and scores

- ``kept``: the dataset-level BN divergence removed by the fit (the D_BN of ``bbgic aux-quality``, before minus
  after calibration, the whole set), as a fraction of what the reference fit removes on the same draw;
- ``gap``: mean |g_budget(x) - g_reference(x)| over the calibrated set, in units of delta (0: the same calibration).

No labels of the test set, no test data and no purification are involved, so a budget chosen here is not tuned on
ASR. Cost is counted in image passes (deterministic); the fit's seconds are printed too, but they are only
comparable on an otherwise idle machine.

    python benchmarks/gic_budget.py [--spec benchmarks/efficacy_5pct.yaml] [--seeds 0] [--steps 25 50 100]
        [--batch 32 64 128] [--report_only]

The rule, fixed before looking at purification: the cheapest budget keeping >= 95 % of the reference's reduction on
average and >= 80 % on every draw. That budget (100 x 32) is now the default. It was checked where it matters, by
purification: a GIC-only efficacy spec carrying it in its gic_overrides, paired cell by cell against the calibrated
cells of the reference's run:

    python benchmarks/gic_budget.py --verify benchmarks/efficacy_5pct_budget.yaml --against benchmarks/efficacy_5pct.yaml
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from backdoorbench_gic.analysis import Col, command_line, describe_machine, frame_table, md_table, pm, standard_error

HERE = Path(__file__).resolve().parent


def collect(spec_path: Path, seeds: list[int] | None, steps: list[int], batches: list[int]) -> pd.DataFrame:
    from backdoorbench_gic.auxdata import build_aux_set
    from backdoorbench_gic.bnstats import dataset_bn_divergence
    from backdoorbench_gic.gic.fit import GICConfig, apply_calibrator, fit_calibrator
    from backdoorbench_gic.records import load_attack_record

    from backdoorbench_gic.matrix import load_spec

    spec = load_spec(spec_path)
    ratio = spec.aux_sizes[0].ratio
    if ratio is None:
        raise SystemExit(f"{spec_path}: this study draws ratio-sized auxiliary sets; the spec's first size has none")
    device = torch.device("cpu")
    reference = dataclasses.replace(GICConfig(), gic_steps=100, gic_batch_size=128, gic_patience=25)
    rows = []
    for attack in spec.attacks:
        if not (spec.bb_root / "record" / attack.record / "attack_result.pt").is_file():
            raise SystemExit(f"victim {attack.record!r} is not under {spec.bb_root}/record: run "
                             f"`python benchmarks/efficacy.py --spec {spec_path}` first (it generates the victims)")
        record = load_attack_record(attack.record, spec.bb_root)
        victim = record.build_model().to(device).eval()
        for aux_type in spec.aux:
            for seed in seeds if seeds is not None else spec.seeds:
                aux = build_aux_set(record, aux_type, ratio=ratio, seed=seed, victim=victim, device=device)
                images = aux.images
                before, _ = dataset_bn_divergence(victim, images, device)

                def fit(cfg: GICConfig) -> dict:
                    t0 = time.perf_counter()
                    result = fit_calibrator(victim, aux, cfg, device=device, seed=seed, progress=False)
                    seconds = time.perf_counter() - t0
                    calibrated = apply_calibrator(result.calibrator, aux, device).images
                    after, _ = dataset_bn_divergence(victim, calibrated, device)
                    return {"steps_run": result.steps, "passes": result.steps * cfg.gic_batch_size,
                            "seconds": seconds, "after": after, "calibrated": calibrated}

                ref = fit(reference)
                removed_ref = before - ref["after"]
                base = {"attack": record.name, "aux_type": aux_type, "seed": seed, "n": len(aux),
                        "dbn_before": before}
                rows.append({**base, "budget": "reference", "steps": reference.gic_steps,
                             "batch": reference.gic_batch_size, **{k: v for k, v in ref.items() if k != "calibrated"},
                             "kept": 1.0, "gap": 0.0})
                for s in steps:
                    for b in batches:
                        cfg = dataclasses.replace(reference, gic_steps=s, gic_batch_size=b, gic_patience=0)
                        out = fit(cfg)
                        gap = (out.pop("calibrated") - ref["calibrated"]).abs().mean().item() / float(reference.delta)
                        kept = (before - out["after"]) / removed_ref if removed_ref > 0 else float("nan")
                        rows.append({**base, "budget": f"{s}x{b}", "steps": s, "batch": b, **out, "kept": kept,
                                     "gap": gap})
                print(f"{record.name} {aux_type} seed {seed}: D_BN {before:.4f} -> {ref['after']:.4f} "
                      f"(reference, {ref['steps_run']} steps)", flush=True)
    return pd.DataFrame(rows)


def report(df: pd.DataFrame, command: str) -> str:
    fits = df[df.budget != "reference"]
    ref = df[df.budget == "reference"]
    table = (fits.groupby(["steps", "batch"])
             .agg(passes=("passes", "mean"), kept_mean=("kept", "mean"), kept_min=("kept", "min"),
                  gap_mean=("gap", "mean"), gap_max=("gap", "max"), seconds=("seconds", "median"))
             .reset_index().sort_values(["passes", "steps"]))
    ref_row = {"steps": f"reference: 100, patience 25 ({ref.steps_run.mean():.0f} run)", "batch": 128,
               "passes": ref.passes.mean(), "kept_mean": 1.0, "kept_min": 1.0, "gap_mean": 0.0, "gap_max": 0.0,
               "seconds": ref.seconds.median()}
    table = pd.concat([pd.DataFrame([ref_row]), table], ignore_index=True)
    table["passes / reference"] = table.passes / ref.passes.mean()
    sets = df[["attack", "aux_type", "seed"]].drop_duplicates().shape[0]
    lines = [f"`{command}` ({dt.datetime.now():%Y-%m-%d %H:%M}; {describe_machine()}). {sets} auxiliary draws "
             f"(mean size {ref.n.mean():.0f}); the packaged calibrator (prompt, L-inf 16/255, BN symmetric KL, "
             "Adam 0.05 with cosine decay over the budget's steps), patience off except in the reference row.",
             "",
             "`kept`: D_BN removed by the budget's fit / D_BN removed by the reference fit on the same draw (mean and "
             "worst draw). `gap`: mean |g_budget(x) - g_reference(x)| / delta. `seconds`: median fit time (comparable "
             "only on an idle machine).",
             "",
             frame_table(table, {"passes": 0, "kept_mean": 3, "kept_min": 3, "gap_mean": 3, "gap_max": 3,
                                 "seconds": 2, "passes / reference": 2}),
             ""]
    per_type = (fits.groupby(["aux_type", "steps", "batch"]).kept.mean().unstack(["steps", "batch"]))
    per_type.columns = [f"{s}x{b}" for s, b in per_type.columns]
    lines += ["`kept` by auxiliary type (mean over victims and seeds):", "",
              frame_table(per_type.reset_index(), {c: 3 for c in per_type.columns}), ""]
    return "\n".join(lines)


def verify(spec_path: Path, against_path: Path) -> str:
    """The budget's calibrated cells minus the reference's, paired by victim, base defense, auxiliary draw and seed."""
    from backdoorbench_gic.matrix import collect_results, load_spec

    new_spec, old_spec = load_spec(spec_path), load_spec(against_path)
    keys = ["attack", "base_defense", "aux_type", "aux_size_label", "seed"]
    cols = {"acc_after": "acc_after", "asr_after": "asr_after", "der": "der", Col.GIC_SECONDS: "fit_s",
            Col.GIC_STEPS: "fit_steps", Col.GIC_CACHED: "cached", Col.BASE_SECONDS: "base_s"}
    new, old = (collect_results(s.output_root) for s in (new_spec, old_spec))
    new, old = (d[d["gic"].astype(bool)].set_index(keys)[list(cols)].rename(columns=cols) for d in (new, old))
    both = new.merge(old, left_index=True, right_index=True, suffixes=("_new", "_old")).reset_index()
    if both.empty:
        raise SystemExit(f"no calibrated cells of {spec_path} pair with {against_path}'s")

    def diff(x: pd.Series, scale: float, digits: int) -> str:
        return pm(x.mean(), standard_error(x), scale, digits, sign=True)

    rows = []
    for (d, aux), g in [*both.groupby(["base_defense", "aux_type"], sort=False), (("all", "all"), both)]:
        fresh = g[g["cached_new"] == 0]
        fresh_old = g[g["cached_old"] == 0]
        rows.append([d, aux, len(g), diff(g.acc_after_new - g.acc_after_old, 100, 2),
                     diff(g.asr_after_new - g.asr_after_old, 100, 2), diff(g.der_new - g.der_old, 1, 4),
                     f"{fresh_old.fit_steps_old.mean():.0f} / {fresh.fit_steps_new.mean():.0f}"
                     if len(fresh) and len(fresh_old) else "(cached)",
                     f"{fresh_old.fit_s_old.mean():.1f} / {fresh.fit_s_new.mean():.1f}"
                     if len(fresh) and len(fresh_old) else "(cached)",
                     f"{g.base_s_new.mean():.1f}"])
    return (f"`python benchmarks/gic_budget.py --verify {spec_path.name} --against {against_path.name}`: the "
            f"calibrated cells of `{new_spec.name}` (gic_overrides {new_spec.gic_overrides}) minus those of "
            f"`{old_spec.name}` (the reference budget), paired over victims x seeds; C-Acc and ASR in points.\n\n"
            + md_table(["defense", "aux", "pairs", "dC-Acc", "dASR", "dDER", "fit steps old / new",
                        "fit s old / new (fresh fits)", "base defense s"], rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=HERE / "efficacy_5pct.yaml")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="default: the spec's seeds")
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--verify", type=Path, default=None, help="a GIC-only efficacy spec run at a chosen budget")
    ap.add_argument("--against", type=Path, default=HERE / "efficacy_5pct.yaml",
                    help="the finished efficacy spec run at the reference budget")
    ap.add_argument("--report_only", action="store_true", help="re-render the report from the saved CSV")
    args = ap.parse_args(argv)
    from backdoorbench_gic.utils.io import atomic_write_text

    if args.verify is not None:
        text = verify(args.verify, args.against)
        name = yaml.safe_load(args.verify.read_text())["name"]
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / f"gic_budget_verify_{name}.md", text + "\n")
        print(text)
        return 0
    name = yaml.safe_load(args.spec.read_text())["name"]
    csv = args.out / f"gic_budget_{name}.csv"
    if args.report_only:
        df = pd.read_csv(csv)
    else:
        df = collect(args.spec, args.seeds, args.steps, args.batch)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(csv, df.to_csv(index=False))
    command = command_line(__file__, argv)
    text = report(df, command.strip())
    atomic_write_text(args.out / f"gic_budget_{name}.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
