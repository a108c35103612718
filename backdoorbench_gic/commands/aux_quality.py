"""``bbgic aux-quality``: which auxiliary set to purify with. Headline: the purification risk, a rank score of the
clean accuracy purification loses with each set (lower is better), with a verdict and what to do about it; beside it
the signals it is built from and the target-class warning (BN-statistics divergence, entropy before and after BN
adapts, predicted-class histogram, Frechet distance to a reference; see :mod:`backdoorbench_gic.auxdata.quality`),
as a table, a CSV and a bar plot.

``bbgic aux-export`` (registered here too, since it shares the set-building arguments): write an auxiliary set
in BackdoorBenchER's ImageFolder layout, ``data/<ds>/<type>/<label:05d>/<i:05d>.png``, so their defenses read it.
"""
from __future__ import annotations

import argparse
from typing import Any

from .common import add_debug_arg, add_device_arg, add_record_args


def _parse_option(text: str) -> tuple[str, Any]:
    from ..config import ConfigError, parse_key_value

    try:
        return parse_key_value(text, "--option")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio", type=float, default=0.05, help="BackdoorBenchER's ratio of |train| (default 0.05)")
    p.add_argument("--n_per_class", type=int, default=None, help="a fixed count per class instead of --ratio")
    p.add_argument("--random_seed", type=int, default=0, help="sampling seed")
    p.add_argument("--option", action="append", default=[], type=_parse_option, metavar="KEY=VALUE",
                   help="source option (YAML value), e.g. --option noise_std=0.3 --option shift_base=train")
    add_device_arg(p)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("aux-quality", help="rank auxiliary sets by the clean accuracy purification would lose with them")
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
    p.add_argument("--wide", action="store_true",
                   help="print every signal (about 190 columns); default: the headline columns, within 120")
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
    from ..auxdata.quality import plot_quality, quality_table
    from ..utils.io import atomic_write_with
    from ..utils.runtime import resolve_device

    record = _record(args)
    df, _ = quality_table(record, args.reserved_type, reference=args.reference,
                          ratio=None if args.n_per_class else args.ratio, n_per_class=args.n_per_class,
                          seed=args.random_seed, options=dict(args.option), device=resolve_device(args.device),
                          batch_size=args.batch_size, flag_margin=args.flag_margin, flag_ratio=args.flag_ratio)
    print(report_text(df, wide=args.wide))
    if args.csv:
        atomic_write_with(args.csv, lambda p: df.to_csv(p, index=False))
        print(f"wrote the table (every signal) to {args.csv}")
    if args.plot:
        plot_quality(df, args.plot, title=f"{record.name}: auxiliary-data alignment")
        print(f"wrote the plot to {args.plot}")
    return 0


# the default table's columns (within 120 characters); --wide prints them all
NARROW_COLUMNS = ("reserved_type", "n", "risk", "verdict", "bn_div", "entropy_adapted", "accuracy", "hist_tvd",
                  "flagged", "fd")


def report_text(df, wide: bool = False) -> str:
    """The table (best risk first; the headline columns, or every signal with ``wide``), which direction is
    better per shown column, each set's verdict with what to do, and the target-class warnings; the prose is
    wrapped at 120 characters."""
    import textwrap

    import pandas as pd

    from ..auxdata.quality import SIGNAL_DIRECTIONS, VERDICTS, verdict_rule

    def wrap(text: str, indent: str = "") -> list[str]:
        return textwrap.wrap(text, 120, initial_indent=indent, subsequent_indent=indent + "    ")

    table = df.sort_values("risk", na_position="last", kind="stable")
    shown = table if wide else table[[c for c in NARROW_COLUMNS if c in table.columns]]
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.float_format", "{:.4g}".format):
        lines = [shown.to_string(index=False), ""]
    lines += wrap("risk ranks the sets by the clean accuracy (C-Acc) purification loses with them: purify with the "
                  "lowest. It is a rank score measured on this victim, not a forecast in points."
                  + ("" if wide else " --wide (or --csv) shows every signal."))
    lines += ["", "columns:"] + [ln for c, d in SIGNAL_DIRECTIONS.items() if c in shown.columns
                                 for ln in wrap(f"{c}: {d}", "  ")]
    ref, ref_risk = df.attrs.get("reference"), df.attrs.get("reference_risk")
    with_ref = ref_risk is not None and ref_risk == ref_risk
    lines += [""] + wrap(f"verdicts ({verdict_rule(ref, ref_risk)}"
                         + ("" if with_ref else "; with --reference reserved, judged against your own in-distribution "
                                                "set instead") + "):")
    for _, row in table.iterrows():
        lines += wrap(f"{row['reserved_type']}: {row['verdict']} - {VERDICTS[row['verdict']]}", "  ")
    flagged = table[table["flagged"].astype(str).str.strip().replace("nan", "") != ""]
    for _, row in flagged.iterrows():
        lines += wrap(f"warning: {row['reserved_type']}: class(es) {row['flagged']} attract far more predictions than "
                      f"their label share (top class {row['top_class']}: {row['top_share']:.1%}); on a backdoored "
                      "victim this can point at the target class: a set that pulls predictions there looks "
                      "trigger-like to the victim; check whether the same class is flagged across unrelated sets")
    return "\n".join(lines)


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
