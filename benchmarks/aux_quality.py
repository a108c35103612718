"""The auxiliary-data diagnostic per auxiliary type on one victim (the score half of the auxiliary-data benchmark;
benchmarks/aux_evidence.py joins it with the efficacy blocks' purification outcomes).

For one attack record, builds every requested auxiliary type with BackdoorBenchER's sampling rule and measures
it with :mod:`backdoorbench_gic.auxdata.quality` (the headline purification risk and its verdict, BN-statistics
divergence, entropy before and after BN adapts, predicted-class histogram with the target-class flag, Frechet
distance to the reference set). Writes ``benchmarks/results/aux_quality_<record>.csv``, ``.md`` (with the machine
and wall time) and ``.png``; ``--append`` measures only the given types and merges them into an existing CSV (a new
shift for aux_evidence.py).

    python benchmarks/aux_quality.py --result_file badnet_fm_cnn16 --bb_root bbgic_bench --n_per_class 20 --seed 0 1 2
    python benchmarks/aux_quality.py --result_file badnet_fm_cnn16 --bb_root bbgic_bench --n_per_class 20 --seed 0 1 2 \
        --append --types reserved_jpeg

Several ``--seed`` values measure one draw per seed (the draws an efficacy spec's seeds purify with) and report each
column's mean over the draws (the verdict from the means, a class flagged in any draw; ``top_*`` from the first).
    python benchmarks/aux_quality.py --demo          # a small generated split + victim (fixture numbers only)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from backdoorbench_gic.analysis import describe_machine
from backdoorbench_gic.auxdata.quality import plot_quality, quality_table
from backdoorbench_gic.config import parse_key_values
from backdoorbench_gic.records import load_attack_record
from backdoorbench_gic.utils.io import atomic_write_text, atomic_write_with
from backdoorbench_gic.utils.logs import console_logging

RESULTS = Path(__file__).resolve().parent / "results"
SPLIT_TYPES = ["train", "reserved", "reserved_brightness", "reserved_contrast", "reserved_color_jitter",
               "reserved_gaussian_blur", "reserved_rotation", "reserved_noise", "reserved_jpeg", "synthetic:inversion",
               "mix:reserved+reserved_noise+reserved_rotation"]
PLAIN_TYPES = ["train", "reserved_gaussian_blur", "reserved_rotation", "reserved_noise", "synthetic:inversion"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result_file", help="record folder name under <bb_root>/record/, or a path")
    p.add_argument("--bb_root", default=None)
    p.add_argument("--types", nargs="+", default=None, help="auxiliary types (default: all that the record supports)")
    p.add_argument("--reference", default=None, help="reference for the Frechet distance (default: reserved or train)")
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--n_per_class", type=int, default=None)
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="sampling seed(s); several: the mean over draws")
    p.add_argument("--device", default="cpu")
    p.add_argument("--option", action="append", default=[], help="source option key=value (YAML value)")
    p.add_argument("--demo", action="store_true", help="make a small generated split record and measure it")
    p.add_argument("--out_dir", default=str(RESULTS))
    p.add_argument("--append", action="store_true",
                   help="merge the measured types into the existing aux_quality_<record>.csv (same types replaced)")
    args = p.parse_args(argv)
    if args.append and not args.types:
        p.error("--append needs --types (the types to add)")
    console_logging()
    options = parse_key_values(args.option, "--option")
    if args.demo:
        from backdoorbench_gic.testing import make_split_record

        root = Path(tempfile.mkdtemp(prefix="bbgic_auxq_"))
        record_dir = make_split_record(root, "badnet_demo", "cifar10", n_train=600, n_test=100, split_ratio=0.2,
                                       train_steps=150, width=16)
        record = load_attack_record(record_dir)
        n_per_class = args.n_per_class or 10
        ratio = None
    elif args.result_file:
        record = load_attack_record(args.result_file, args.bb_root)
        n_per_class, ratio = args.n_per_class, None if args.n_per_class else args.ratio
    else:
        p.error("give --result_file or --demo")
    from backdoorbench_gic.data.datasets import SplitDataset

    is_split = isinstance(record.dataset(), SplitDataset)
    types = args.types or (SPLIT_TYPES if is_split else PLAIN_TYPES)
    if not is_split and any(t.startswith("reserved_") for t in types):
        options.setdefault("shift_base", "train")  # no held-out split: shift seen images (stated in the output)
    reference = args.reference or ("reserved" if is_split else "train")
    t0 = time.perf_counter()
    df = mean_over_draws([quality_table(record, types, reference=reference, ratio=ratio, n_per_class=n_per_class,
                                        seed=seed, options=options, device=args.device)[0] for seed in args.seed])
    wall = time.perf_counter() - t0
    out = Path(args.out_dir)
    stem = f"aux_quality_{record.name}"
    if args.append and (out / f"{stem}.csv").is_file():
        import pandas as pd

        old = pd.read_csv(out / f"{stem}.csv")
        df = pd.concat([old[~old["reserved_type"].isin(types)], df], ignore_index=True)
    atomic_write_with(out / f"{stem}.csv", lambda path: df.to_csv(path, index=False))
    plot_quality(df, out / f"{stem}.png", title=f"{record.name}: purification risk per auxiliary set")
    md = [f"# Auxiliary-data diagnostic: {record.name}", "",
          f"record `{record.name}` ({record.model_name}, {record.clean_data}, target {record.target}); "
          f"sampling {'n_per_class ' + str(n_per_class) if n_per_class else 'ratio ' + str(ratio)}, "
          f"seed(s) {', '.join(map(str, args.seed))}{' (column means over the draws)' if len(args.seed) > 1 else ''}; "
          f"reference {reference}; options {options or '-'}; {describe_machine(torch_threads=True)}; {wall:.1f} s"
          + ("; demo fixture: numbers describe generated data, not a real dataset" if args.demo else "")
          + (f"; this run measured {', '.join(types)} and merged them into the earlier table" if args.append else ""),
          "",
          df.to_markdown(index=False, floatfmt=".4f") if _has_tabulate()
          else "```\n" + df.to_string(index=False) + "\n```"]
    atomic_write_text(out / f"{stem}.md", "\n".join(md) + "\n")
    print(df.to_string(index=False))
    print(f"wrote {out / stem}.{{csv,md,png}} in {wall:.1f} s")
    return 0


def mean_over_draws(frames: list):
    """One table from per-draw tables of the same types: numeric columns averaged, the verdict recomputed from the
    means (against the mean reference risk), ``flagged`` the classes flagged in any draw, ``top_class`` (and its
    share and attraction) the first draw's."""
    import pandas as pd

    from backdoorbench_gic.auxdata.quality import risk_verdict

    if len(frames) == 1:
        return frames[0]
    first = frames[0]
    out = first.copy()
    keep_first = {"reserved_type", "n", "top_class", "top_share", "top_attraction", "verdict", "flagged"}
    for c in first.columns:
        if c not in keep_first and pd.api.types.is_numeric_dtype(first[c]):
            out[c] = sum(f[c].to_numpy(dtype=float) for f in frames) / len(frames)
    refs = [f.attrs.get("reference_risk") for f in frames]
    ref = sum(refs) / len(refs) if all(r is not None for r in refs) else None
    out.attrs.update(first.attrs, reference_risk=ref)
    out["verdict"] = [risk_verdict(r, e, ea, ref) for r, e, ea in zip(out["risk"], out["entropy"], out["entropy_adapted"])]
    out["flagged"] = [" ".join(sorted({c for f in frames for c in str(f["flagged"].iloc[i]).split() if c != "nan"},
                                      key=int)) for i in range(len(first))]
    return out


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
