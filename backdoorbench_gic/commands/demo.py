"""``bbgic demo``: the embedded demo from any directory (what ``python run_defense.py`` runs inside a clone):
backdoor a victim on scikit-learn's digits, remove the backdoor with FST on reserved and shifted auxiliary data,
without and with GIC, and print the table. See :mod:`backdoorbench_gic.demo`."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    from ..demo import add_demo_args

    p = sub.add_parser("demo", help="the embedded demo: a BadNets victim on digits, its backdoor removed with FST, "
                                    "without and with GIC (about 2 min on 2 CPU cores)",
                       description="Split the dataset, train a BadNets victim (reused when a record made with the "
                                   "same settings is cached), purify it with FST on reserved and shifted auxiliary "
                                   "data, without and with GIC (settings chosen on held-out reserved images, never "
                                   "on the test set), and print one table with a reading that calls each row a "
                                   "success or a failure. Writes under --bb_root (default ./bbgic_demo).")
    add_demo_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import run_from_args

    return run_from_args(args, prog="bbgic demo")
