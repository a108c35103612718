"""``bbgic patch``: install GIC into a BackdoorBench checkout (new files only), check it, or remove it."""
from __future__ import annotations

import argparse

from .common import add_debug_arg, flag_names


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("patch", help="install defense/gic.py and config/defense/gic/ into a BackdoorBench checkout")
    p.add_argument("checkout", nargs="?", help="path to the BackdoorBench or BackdoorBenchER checkout")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="verify an installed copy")
    mode.add_argument("--remove", action="store_true", help="remove what bbgic patch installed")
    mode.add_argument(*flag_names("write_patch"), dest="write_patch", metavar="FILE", nargs="?", const="",
                      help="write the git-apply patch (default: patches/backdoorbench-gic.patch) instead")
    p.add_argument("--force", action="store_true", help="overwrite (or remove) files bbgic did not write or that changed")
    add_debug_arg(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import patching

    if args.write_patch is not None:
        print(patching.write_patch_file(Path(args.write_patch) if args.write_patch else None))
        return 0
    if not args.checkout:
        raise ValueError("name the checkout: bbgic patch <path to BackdoorBench>")
    if args.check:
        rep = patching.check(args.checkout)
        for rel in rep.installed:
            print(f"ok       {rel}")
        for prob in rep.problems:
            print(f"PROBLEM  {prob}")
        print(f"{rep.flavour} checkout: {'GIC installed and intact' if not rep.problems else 'GIC installation has problems'}")
        return 0 if not rep.problems else 1
    if args.remove:
        rep = patching.remove(args.checkout, force=args.force)
        for rel in rep.installed:
            print(f"removed  {rel}")
        print(f"GIC removed from the {rep.flavour} checkout at {args.checkout}")
        return 0
    rep = patching.install(args.checkout, force=args.force)
    for rel in rep.installed:
        print(f"wrote    {rel}")
    for rel in rep.skipped:
        print(f"current  {rel}")
    print(f"GIC installed into the {rep.flavour} checkout at {args.checkout}. Run from its root, e.g.:\n"
          f"  cd {args.checkout} && python defense/gic.py --result_file <record> "
          "--yaml_path ./config/defense/gic/cifar10.yaml --dataset cifar10 --reserved_type train --base ft")
    return 0
