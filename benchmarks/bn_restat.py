"""Does fine-tuning on shifted data remove the backdoor through the BatchNorm running statistics, and is that what
GIC takes away? A causal test on a finished efficacy run, without any training.

FT and FST fine-tune in train mode, so besides the weights they re-estimate every BatchNorm layer's running mean and
variance on the auxiliary set; SAU keeps the victim's. On a shifted set those statistics follow the shift. Two
interventions separate the statistics from the weights (re-estimation: ``bnstats.recalibrate_bn``, the whole set as
one batch, so the running statistics are exactly the set's):

- ``restat reserved``: the purified weights with their statistics re-estimated on the in-distribution ``reserved``
  draw of the same seed. If a shifted set's removal lives in its statistics, its ASR climbs back here (and a
  reserved-purified model barely changes: a check). If GIC's ASR rise is the statistics, the paired
  calibrated-minus-uncalibrated ASR change shrinks here.
- ``victim + S statistics`` (uncalibrated cells): the victim's weights with statistics re-estimated on the cell's own
  auxiliary draw S, no fine-tuning at all. If the shift's statistics alone disrupt the backdoor, ASR falls here for
  shifted S and not for in-distribution S.

Every cell's purified model (defense_result.pt, safe loader) is first re-evaluated as purified on the run's fixed
test subset; the script stops unless that reproduces the run's own numbers. Auxiliary types covered: train,
reserved and the reserved_<shift> sets. Re-estimating on reserved uses clean auxiliary data only (what a defender
holds); nothing here sees training data or tunes anything.

    python benchmarks/bn_restat.py [--spec benchmarks/efficacy_5pct.yaml] [--defenses ft fst]
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from backdoorbench_gic.analysis import IN_DISTRIBUTION, Victims, finished_cells, md_table

HERE = Path(__file__).resolve().parent


def covered(aux_type: str) -> bool:
    return aux_type in IN_DISTRIBUTION or aux_type.startswith("reserved_")


def collect(spec, defenses: list[str]) -> pd.DataFrame:
    from dataclasses import replace

    from backdoorbench_gic.auxdata import build_aux_set
    from backdoorbench_gic.bnstats import recalibrate_bn
    from backdoorbench_gic.evaluation import evaluate
    from backdoorbench_gic.evaluation import eval_sets
    from backdoorbench_gic.results import TIDY_ROW_FILE

    output_root, eval_limit = Path(spec.output_root), spec.eval_limit
    victims = Victims(Path(spec.bb_root))
    aux_cache: dict[tuple, object] = {}

    def aux_set(record, cell):
        """The auxiliary draw ``cell`` purified with (its request: type, size, seed, source options)."""
        req = cell.request(spec)
        o = req.overrides
        key = (record.name, o["reserved_type"], o.get("ratio"), req.n_per_class, o["random_seed"])
        if key not in aux_cache:
            aux_cache[key] = build_aux_set(record, o["reserved_type"], ratio=None if req.n_per_class else o["ratio"],
                                           n_per_class=req.n_per_class, seed=o["random_seed"], options=req.aux_options)
        return aux_cache[key]

    rows = []
    for cell in finished_cells(output_root):
        row, result = cell.row, cell.cell_dir / TIDY_ROW_FILE
        defense = cell.base_defense
        if defense not in defenses or not covered(row["aux_type"]):
            continue
        label = str(row["aux_size_label"])
        if not label.startswith("r"):
            raise SystemExit(f"{result}: this test re-draws ratio-sized auxiliary sets; the cell's size is {label!r}")
        spec_cell = spec.cell_of(row)
        record = victims.record(cell.attack)
        model, clean, bd = victims.derived(cell.attack, "model and test sets",
                                           lambda r: (r.build_model(), *eval_sets(r, eval_limit)))
        out = {k: row[k] for k in ("attack", "aux_type", "seed", "gic", "acc_before", "asr_before", "acc_after",
                                   "asr_after")}
        out["defense"] = defense

        def measure(state: dict, restat_on=None) -> tuple[float, float]:
            """C-Acc and ASR of ``state`` (copied into the shared model), its BN statistics first re-estimated on
            ``restat_on`` when given."""
            model.net.load_state_dict(state)
            if restat_on is not None:
                recalibrate_bn(model, restat_on)
            m = evaluate(model.eval(), clean, bd)
            return m.acc, m.asr

        purified = cell.purified_state()
        out["acc_purified"], out["asr_purified"] = measure(purified)
        out["acc_restat_reserved"], out["asr_restat_reserved"] = measure(
            purified, aux_set(record, replace(spec_cell, aux="reserved").uncalibrated()))
        if not row["gic"]:
            own = aux_set(record, spec_cell)
            drawn = cell.cell_dir / "log" / "index.txt"
            if drawn.is_file() and not np.array_equal(np.sort(np.loadtxt(drawn, dtype=np.int64, ndmin=1)),
                                                      np.sort(own.indices.numpy())):
                raise SystemExit(f"{result}: the re-drawn {row['aux_type']} set differs from the cell's log/index.txt")
            out["acc_victim_restat"], out["asr_victim_restat"] = measure(record.state_dict, own)
        rows.append(out)
    if not rows:
        raise SystemExit(f"no finished cells of {defenses} under {output_root}/cells: run the efficacy spec first")
    df = pd.DataFrame(rows)
    worst = max((df["acc_purified"] - df["acc_after"]).abs().max(), (df["asr_purified"] - df["asr_after"]).abs().max())
    if worst > 1e-6:
        raise SystemExit(f"re-evaluating the purified models does not reproduce the run's numbers (max |d| {worst:.4g}): "
                         "wrong test subset or wrong bb_root")
    return df


def report(df: pd.DataFrame, spec_name: str) -> str:
    df = df.copy()
    pct = [c for c in df if c.startswith(("acc_", "asr_"))]
    df[pct] = df[pct] * 100
    victims = df.groupby("attack")[["acc_before", "asr_before"]].first()
    out = [f"## Does fine-tuning remove the backdoor through the BatchNorm statistics?\n\nEfficacy spec `{spec_name}`; "
           f"{dt.datetime.now():%Y-%m-%d %H:%M}; `python benchmarks/bn_restat.py`. C-Acc / ASR in %, means over seeds. "
           "Victims (C-Acc / ASR): " + "; ".join(f"{a} {r.acc_before:.2f} / {r.asr_before:.2f}"
                                                for a, r in victims.iterrows()) + ".\n"]
    cols = ["acc_purified", "asr_purified", "acc_restat_reserved", "asr_restat_reserved", "acc_victim_restat",
            "asr_victim_restat"]
    means = df.groupby(["attack", "defense", "aux_type", "gic"])[cols].mean().reset_index()

    def f(v: float) -> str:
        return "-" if v != v else f"{v:.1f}"

    out.append(md_table(["attack", "defense", "aux", "GIC", "C-Acc", "ASR", "C-Acc restat reserved",
                         "ASR restat reserved", "C-Acc victim + S stats", "ASR victim + S stats"],
                        [[r.attack, r.defense, r.aux_type, "yes" if r.gic else "no",
                          *(f(getattr(r, c)) for c in cols)] for r in means.itertuples()]))
    key = ["attack", "defense", "aux_type", "seed"]
    plain, calib = df[~df["gic"]].set_index(key), df[df["gic"]].set_index(key)
    d = (calib[["asr_purified", "asr_restat_reserved"]] - plain[["asr_purified", "asr_restat_reserved"]]).dropna()
    d = d.reset_index()
    rows = []
    for (attack, defense), g in plain.reset_index().groupby(["attack", "defense"]):
        ind, sh = g[g["aux_type"].isin(IN_DISTRIBUTION)], g[g["aux_type"].str.startswith("reserved_")]
        dd = d[(d["attack"] == attack) & (d["defense"] == defense) & d["aux_type"].str.startswith("reserved_")]
        rows.append([attack, defense, str(len(sh)),
                     f"{ind['acc_purified'].mean():.1f} / {sh['acc_purified'].mean():.1f}",
                     f"{ind['acc_restat_reserved'].mean():.1f} / {sh['acc_restat_reserved'].mean():.1f}",
                     f"{ind['asr_purified'].mean():.1f} / {sh['asr_purified'].mean():.1f}",
                     f"{ind['asr_restat_reserved'].mean():.1f} / {sh['asr_restat_reserved'].mean():.1f}",
                     f"{ind['asr_victim_restat'].mean():.1f} / {sh['asr_victim_restat'].mean():.1f}",
                     f"{dd['asr_purified'].mean():+.1f}", f"{dd['asr_restat_reserved'].mean():+.1f}"])
    out += ["\nSummary per victim and defense: C-Acc and ASR (%) after purification on in-distribution (train, "
            "reserved) / shifted (reserved_<shift>) sets without GIC, the same with the statistics re-estimated on "
            "reserved, the victim's ASR with S's statistics and no fine-tuning; and GIC's paired ASR change on the "
            "shifted sets (points), as purified and after re-estimating on reserved:\n",
            md_table(["attack", "defense", "shifted cells", "C-Acc in-dist / shifted", "C-Acc restat reserved",
                      "ASR in-dist / shifted", "ASR restat reserved", "ASR victim + S stats", "GIC dASR",
                      "GIC dASR restat reserved"], rows)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(HERE / "efficacy_5pct.yaml"))
    p.add_argument("--defenses", nargs="+", default=["ft", "fst"], help="base defenses that fine-tune in train mode")
    p.add_argument("--out", default=None, help="default: benchmarks/results/bn_restat_<spec name>.md")
    p.add_argument("--report_only", action="store_true", help="re-render the report from the saved CSV beside --out")
    args = p.parse_args(argv)

    from backdoorbench_gic.matrix import load_spec
    from backdoorbench_gic.utils.io import atomic_write_text

    torch.set_num_threads(1)
    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else HERE / "results" / f"bn_restat_{spec.name}.md"
    if args.report_only:
        df = pd.read_csv(out.with_suffix(".csv"))
    else:
        df = collect(spec, args.defenses)
        atomic_write_text(out.with_suffix(".csv"), df.to_csv(index=False))
    text = report(df, Path(args.spec).name)
    atomic_write_text(out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
