#!/usr/bin/env python
# Installed by backdoorbench-gic (`bbgic patch`); a new file, not part of BackdoorBench. Remove with `bbgic patch --remove .`
"""Guided Input Calibration (GIC) as a BackdoorBench defense script.

Run from the BackdoorBench (or BackdoorBenchER) root, like every other defense:

    python defense/gic.py --result_file badnet_demo --yaml_path ./config/defense/gic/cifar10.yaml \
        --dataset cifar10 --reserved_type reserved_noise --base ft

It fits a bounded input calibration g through the frozen backdoored model, calibrates the clean subset chosen
by --ratio/--index/--reserved_type, and runs the base defense (--base: ft, ft-sam, fst, sau, i-bau, ...) on it.
Results go to record/<result_file>/defense/gic-<base>/<yaml name>/ in BackdoorBench's layout
(defense_result.pt, gic-<base>_df.csv, gic-<base>_df_summary.csv, log/, checkpoint/).

--device defaults to auto (CUDA when present, else the CPU). The work is done by the backdoorbench-gic package,
which is not on PyPI: install it from its source tree (python -m pip install -e <path to backdoorbench-gic>)
into the environment BackdoorBench runs in. Nothing of BackdoorBench's code is imported, so it also runs where
their loader fails (torch >= 2.6 refuses attack_result.pt without weights_only=False; this script loads it with
weights_only=True and an allow-list of the numpy types such records contain). The CUDA path has not yet run on a
GPU (only the CPU path is tested).
"""
import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result_file", required=True, help="the attack's save_folder_name under ./record/")
    p.add_argument("--yaml_path", default="./config/defense/gic/config.yaml",
                   help="GIC and base-defense settings (default ./config/defense/gic/config.yaml)")
    p.add_argument("--dataset", default=None, help="dataset name (as BackdoorBench: pass it explicitly)")
    p.add_argument("--device", default=None,
                   help="auto (CUDA when present, else the CPU), cpu, cuda or cuda:N; default: the yaml's device (auto)")
    p.add_argument("--ratio", default=None, help="share of the training set used as clean data")
    p.add_argument("--index", default=None, help="file of clean-subset indices")
    p.add_argument("--reserved_type", default=None, help="BackdoorBenchER auxiliary data type (train, reserved, ...)")
    p.add_argument("--base", default=None, help="base defense run on the calibrated data (default from the yaml)")
    p.add_argument("--random_seed", default=None, help="one seed for sampling, calibration and training")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load attack_result.pt with weights_only=False (only for records you made or trust)")
    return p


def main(argv=None) -> int:
    try:
        from backdoorbench_gic.commands.defend import format_row, parse_extra_flags
        from backdoorbench_gic.pipeline import DefenseRequest, run_defense
        from backdoorbench_gic.utils.logs import console_logging
    except ImportError:
        print("defense/gic.py needs the backdoorbench-gic package (not on PyPI): python -m pip install -e "
              "<path to the backdoorbench-gic source tree>", file=sys.stderr)
        return 2
    args, extra = build_parser().parse_known_args(argv)
    overrides = parse_extra_flags(extra)  # any GIC or base-defense key as --key value
    for key in ("ratio", "index", "reserved_type", "base", "random_seed"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    yaml_path = args.yaml_path if args.yaml_path and os.path.isfile(args.yaml_path) else None
    if args.yaml_path and yaml_path is None:
        print(f"warning: {args.yaml_path} does not exist; using the package's GIC defaults", file=sys.stderr)
    console_logging()
    req = DefenseRequest(
        result_file=args.result_file, defense="gic", bb_root=os.getcwd(), dataset=args.dataset, yaml_path=yaml_path,
        overrides=overrides, device=args.device, trust_checkpoint=args.trust_checkpoint,
        variant=os.path.splitext(os.path.basename(args.yaml_path or "config.yaml"))[0],
    )
    try:
        row = run_defense(req)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"defense/gic.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_row(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
