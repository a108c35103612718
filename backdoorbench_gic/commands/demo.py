"""``bbgic demo``: the embedded demo from any directory (what ``python run_defense.py`` runs inside a clone):
backdoor a victim on scikit-learn's digits, purify it with fine-tuning on reserved and shifted auxiliary data,
without and with GIC, and print the table. See :mod:`backdoorbench_gic.demo`."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    from ..demo import add_demo_args

    p = sub.add_parser("demo", help="the embedded demo: a BadNets victim on digits, purified with FT, without and with "
                                    "GIC (about 1-3 min on 2 CPU cores)",
                       description="Split the dataset, train a BadNets victim (reused when its record is valid), "
                                   "purify it with FT on reserved and shifted auxiliary data, without and with GIC, "
                                   "and print one table. Writes under --bb_root (default ./bbgic_demo).")
    add_demo_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import run_from_args

    return run_from_args(args, prog="bbgic demo")
