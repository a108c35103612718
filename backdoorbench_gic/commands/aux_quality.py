"""``bbgic aux-quality``: how far auxiliary sets are from a victim's training distribution (BN-statistics
divergence, prediction entropy, predicted-class histogram, Frechet distance to a reference, alignment score;
see :mod:`backdoorbench_gic.auxdata.quality`), as a table, a CSV and a bar plot.

``bbgic aux-export`` (registered here too, since it shares the set-building arguments): write an auxiliary set
in BackdoorBenchER's ImageFolder layout, ``data/<ds>/<type>/<label:05d>/<i:05d>.png``, so their defenses read it.
"""
from __future__ import annotations

import argparse
from typing import Any

from .common import add_debug_arg, add_device_arg, add_record_args


def _parse_option(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option needs key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def _add_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio", type=float, default=0.05, help="BackdoorBenchER's ratio of |train| (default 0.05)")
    p.add_argument("--n_per_class", type=int, default=None, help="a fixed count per class instead of --ratio")
    p.add_argument("--random_seed", type=int, default=0, help="sampling seed")
    p.add_argument("--option", action="append", default=[], type=_parse_option, metavar="KEY=VALUE",
                   help="source option (YAML value), e.g. --option noise_std=0.3 --option shift_base=train")
    add_device_arg(p)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("aux-quality", help="measure how well auxiliary sets match a victim's training distribution")
    add_record_args(p)
    p.add_argument("--reserved_type", nargs="+", required=True, metavar="T",
                   help="auxiliary types to measure (train reserved reserved_noise external:digits ...)")
    p.add_argument("--reference", default=None, help="reference type for the Frechet distance (e.g. reserved)")
    p.add_argument("--plot", default=None, help="write a bar plot here (PNG/PDF/SVG)")
    p.add_argument("--csv", default=None, help="write the table here")
    p.add_argument("--batch_size", type=int, default=256, help="batch size of the victim's passes (default 256)")
    p.add_argument("--flag_margin", type=float, default=0.25,
                   help="flag a class predicted at least this much above its label share ...")
    p.add_argument("--flag_ratio", type=float, default=2.0, help="... and at least this many times its share")
    _add_set_args(p)
    add_debug_arg(p)
    p.set_defaults(func=run)

    e = sub.add_parser("aux-export", help="write an auxiliary set in BackdoorBenchER's ImageFolder layout")
    add_record_args(e)
    e.add_argument("--reserved_type", required=True, metavar="T", help="the auxiliary type to export (reserved_noise, ...)")
    e.add_argument("--out", default=None,
                   help="target folder (default: <record's dataset folder>/<reserved_type>, where BackdoorBenchER's "
                        "--reserved_type reads it)")
    e.add_argument("--all", action="store_true", help="export the whole pool instead of a sample")
    e.add_argument("--refuse_float", action="store_true", help="refuse float sets instead of quantising them")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export")
    _add_set_args(e)
    add_debug_arg(e)
    e.set_defaults(func=run_export)
    return p


def _record(args):
    from ..records import load_attack_record

    return load_attack_record(args.result_file, args.bb_root, trust=args.trust_checkpoint, dataset_dir=args.dataset_dir)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..auxdata.quality import plot_quality, quality_table
    from ..utils.io import atomic_write_with
    from ..utils.runtime import resolve_device

    record = _record(args)
    df, _ = quality_table(record, args.reserved_type, reference=args.reference,
                          ratio=None if args.n_per_class else args.ratio, n_per_class=args.n_per_class,
                          seed=args.random_seed, options=dict(args.option), device=resolve_device(args.device),
                          batch_size=args.batch_size, flag_margin=args.flag_margin, flag_ratio=args.flag_ratio)
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.4f}".format):
        print(df.to_string(index=False))
    flagged = df[df["flagged"].astype(str).str.strip() != ""]
    for _, row in flagged.iterrows():
        print(f"note: {row['reserved_type']}: class(es) {row['flagged']} attract far more predictions than their "
              f"label share (top class {row['top_class']}: {row['top_share']:.1%}); on a backdoored victim this "
              "can point at the target class")
    if args.csv:
        atomic_write_with(args.csv, lambda p: df.to_csv(p, index=False))
        print(f"csv: {args.csv}")
    if args.plot:
        plot_quality(df, args.plot, title=f"{record.name}: auxiliary-data alignment")
        print(f"plot: {args.plot}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..auxdata import build_aux_set
    from ..auxdata.layout import export_image_folder
    from ..utils.runtime import resolve_device

    record = _record(args)
    ratio = None if (args.all or args.n_per_class) else args.ratio
    aux = build_aux_set(record, args.reserved_type, ratio=ratio, n_per_class=args.n_per_class, seed=args.random_seed,
                        options=dict(args.option), device=resolve_device(args.device))
    safe = "".join(c if c.isalnum() or c in "-_.+@" else "_" for c in args.reserved_type)
    out = Path(args.out) if args.out else Path(record.dataset_dir()) / safe
    export_image_folder(aux, out, float_policy="error" if args.refuse_float else "quantize", overwrite=args.overwrite,
                        meta={"record": record.name, "reserved_type": args.reserved_type, "seed": args.random_seed})
    print(f"exported {len(aux)} images to {out}")
    return 0
