"""``bbgic inspect``: what an attack record holds and whether it is valid (exit code 0 valid, 1 not)."""
from __future__ import annotations

import argparse

from .common import add_debug_arg, add_device_arg, add_record_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="validate a BackdoorBench attack record and summarise it")
    add_record_args(p, positional=True)
    p.add_argument("--evaluate", action="store_true",
                   help="recompute C-Acc/ASR/RA and compare with attack_df_summary.csv (row 'last')")
    add_device_arg(p)
    p.add_argument("--batch_size", type=int, default=512, help="evaluation batch size (default 512)")
    add_debug_arg(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..inspection import inspect_record

    report = inspect_record(args.result_file, args.bb_root, trust=args.trust_checkpoint, evaluate=args.evaluate,
                            device=args.device, batch_size=args.batch_size, dataset_dir=args.dataset_dir)
    print(report.render())
    return 0 if report.valid else 1
