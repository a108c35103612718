"""Does the alignment diagnostic predict what purification will cost? Joins `bbgic aux-quality` scores per
auxiliary type (benchmarks/aux_quality.py, run on each victim with the efficacy draw) with the efficacy run's
uncalibrated purification outcomes on the same victims and types, and reports Spearman rank correlations.

    python benchmarks/aux_quality.py --result_file badnet_fm_cnn16 --bb_root bbgic_bench --n_per_class 20 \
        --types train reserved ... (the efficacy aux list)
    python benchmarks/aux_evidence.py

A useful diagnostic ranks the types as purification does: higher alignment, higher C-Acc after purification
and smaller loss against `reserved`. The score never sees labels of the test set, or any training data.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import pandas as pd

from backdoorbench_gic.analysis import md_table

HERE = Path(__file__).resolve().parent

SIGNALS = ["alignment", "bn_div", "entropy", "hist_tvd", "fd"]
OUTCOMES = ["acc_after", "acc_loss", "asr_after", "der"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(HERE / "efficacy.yaml"))
    p.add_argument("--quality_dir", default=str(HERE / "results"))
    p.add_argument("--out", default=str(HERE / "results" / "aux_evidence.md"))
    args = p.parse_args(argv)

    from backdoorbench_gic.matrix import collect_results, load_spec
    from backdoorbench_gic.utils.io import atomic_write_text

    spec = load_spec(args.spec)
    df = collect_results(spec.output_root)
    df = df[~df["gic"]]
    out = [f"## Alignment diagnostic vs purification outcome\n\nEfficacy spec `{Path(args.spec).name}` "
           f"(uncalibrated cells, means over seeds); scores from `benchmarks/aux_quality.py` on the same victims, "
           f"types and draw size (seed 0); {dt.datetime.now():%Y-%m-%d %H:%M}. Spearman rho over the auxiliary "
           "types, per victim and defense; `acc_loss` = C-Acc(reserved) - C-Acc(type).\n"]
    corr_rows, joined_all = [], []
    for attack in sorted(df["attack"].unique()):
        qpath = Path(args.quality_dir) / f"aux_quality_{attack}.csv"
        if not qpath.is_file():
            print(f"missing {qpath}: run benchmarks/aux_quality.py on {attack} first", file=sys.stderr)
            continue
        q = pd.read_csv(qpath).rename(columns={"reserved_type": "aux_type", "name": "aux_type"}).set_index("aux_type")
        for defense, g in df[df["attack"] == attack].groupby("base_defense"):
            m = g.groupby("aux_type")[["acc_after", "asr_after", "der"]].mean()
            if "reserved" not in m.index:
                continue
            m["acc_loss"] = m.loc["reserved", "acc_after"] - m["acc_after"]
            j = m.join(q[[c for c in SIGNALS if c in q]], how="inner")
            j["attack"], j["defense"] = attack, defense
            joined_all.append(j.reset_index())
            for sig in [c for c in SIGNALS if c in j and j[c].notna().sum() > 2]:
                rho = {o: j[sig].corr(j[o], method="spearman") for o in OUTCOMES}
                corr_rows.append([attack, defense, sig, len(j)] + [f"{rho[o]:+.2f}" for o in OUTCOMES])
    if not joined_all:
        print("nothing to join", file=sys.stderr)
        return 1
    allj = pd.concat(joined_all)
    ft = allj[allj["defense"] == "ft"].sort_values(["attack", "alignment"], ascending=[True, False])
    out.append("Per type (FT):\n\n" + md_table(
        ["victim", "aux", "alignment", "D_BN", "entropy", "hist TVD", "FD", "C-Acc after", "C-Acc loss", "ASR after",
         "DER"],
        [[r.attack, r.aux_type, f"{r.alignment:.3f}", f"{r.bn_div:.3f}", f"{r.entropy:.3f}", f"{r.hist_tvd:.3f}",
          "-" if pd.isna(getattr(r, "fd", float("nan"))) else f"{r.fd:.2f}", f"{r.acc_after * 100:.1f}",
          f"{r.acc_loss * 100:+.1f}", f"{r.asr_after * 100:.1f}", f"{r.der:.3f}"] for r in ft.itertuples()]))
    out.append("Rank correlations (a good alignment score: positive with C-Acc after, negative with the loss; "
               "D_BN, entropy, TVD and FD the other way round):\n\n"
               + md_table(["victim", "defense", "signal", "types"] + [f"rho vs {o}" for o in OUTCOMES], corr_rows))
    text = "\n\n".join(out) + "\n"
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
