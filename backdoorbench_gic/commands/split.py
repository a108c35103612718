"""``bbgic split``: BackdoorBenchER's held-out split ``data/<ds>_split_<pct>_seed_<s>/`` (train/, reserved/, test/,
index files, meta.txt), optionally with the shifted reserved sets (``reserved_<shift>/``) their defenses read."""
from __future__ import annotations

import argparse

from .common import add_debug_arg


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("split", help="make a BackdoorBenchER split dataset with a reserved (held-out) part",
                       description="Write <dataset_path>/<dataset>_split_<int(100*ratio)>_seed_<seed>/ with train/, "
                                   "reserved/ (floor(ratio x class count) per class) and test/ ImageFolder trees, "
                                   "train_idx.txt / reserved_idx.txt / test_idx.txt and meta.txt (last). Existing "
                                   "index files are reloaded; an interrupted run is completed by rerunning it. Train "
                                   "the victim on the split name so that --reserved_type reserved has unseen data.")
    p.add_argument("--dataset", required=True, help="base dataset name (cifar10, gtsrb, mnist, fashion-mnist, ...)")
    p.add_argument("--split_ratio", type=float, default=0.05, help="share of each class reserved (default 0.05)")
    p.add_argument("--random_seed", type=int, default=0, help="seed of the per-class reserved draw (default 0)")
    p.add_argument("--dataset_path", default="./data", help="BackdoorBench's dataset_path (default ./data)")
    p.add_argument("--bb_root", default=None, help="BackdoorBench root the dataset_path is relative to (default .)")
    p.add_argument("--ood_types", nargs="*", default=[], metavar="SHIFT",
                   help="also write reserved_<shift>/ for these shifts (brightness contrast color_jitter gaussian_blur "
                        "rotation noise jpeg; 'all' = BackdoorBenchER's six), as BackdoorBenchER's generate_ood.py")
    p.add_argument("--shift_seed", type=int, default=0, help="seed of the per-image shift parameters")
    p.add_argument("--noise_wrap", action="store_true",
                   help="BackdoorBenchER parity for noise: wrap out-of-range pixels around instead of clipping")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    add_debug_arg(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..auxdata.layout import export_reserved_shift
    from ..auxdata.shifts import ER_SHIFTS, SHIFT_NAMES
    from ..auxdata.split import make_split

    progress = False if args.no_progress else None
    out = make_split(args.dataset, args.split_ratio, args.random_seed, dataset_path=args.dataset_path,
                     bb_root=args.bb_root, progress=progress)
    print(f"split: {out}")
    shifts = list(ER_SHIFTS) if args.ood_types == ["all"] else list(args.ood_types)
    for s in shifts:
        if s not in SHIFT_NAMES or s == "tv":
            choices = ", ".join(n for n in SHIFT_NAMES if n != "tv")
            raise ValueError(f"unknown --ood_types value {s!r}; choose from {choices} or all")
        opts = {"shift_seed": args.shift_seed}
        if s == "noise" and args.noise_wrap:
            opts["noise_wrap"] = True
        print(f"shifted: {export_reserved_shift(out, s, options=opts, progress=progress)}")
    return 0
