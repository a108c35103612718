"""``bbgic calibrate``: Guided Input Calibration alone. Fit g through the frozen victim on an auxiliary set and
write the calibrated set in BackdoorBenchER's ``_vp`` format, ``data/<dataset>/<type>_vp/<result_file>/images.npy``
(float32 N x H x W x C in [0,1]) and ``labels.npy`` (int64), so their own defenses run on it with
``--reserved_type <type>_vp`` (and ours read it back the same way).

By default the whole pool of the auxiliary type is calibrated (BackdoorBenchER's loader then applies its own
ratio rule to the arrays); ``--ratio`` / ``--n_per_class`` calibrate a sampled subset instead. GIC keys
(delta, family, objectives, gic_steps, ...) come from ``defense_configs/gic/<dataset>.yaml`` < ``--yaml_path`` <
``--key value`` flags.
"""
from __future__ import annotations

import argparse

from .common import add_debug_arg, add_device_arg, add_record_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="fit GIC on an auxiliary set and export BackdoorBenchER _vp arrays",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_record_args(p)
    p.add_argument("--reserved_type", required=True, help="the auxiliary type to calibrate (reserved_noise, ...)")
    p.add_argument("--dataset", default=None, help="dataset name for the output path (default: the record's)")
    p.add_argument("--dataset_path", default="./data", help="BackdoorBench's data folder, relative to --bb_root")
    p.add_argument("--yaml_path", default=None, help="GIC settings overriding defense_configs/gic/<dataset>.yaml")
    p.add_argument("--ratio", type=float, default=None, help="calibrate ratio x |train| sampled images, not the pool")
    p.add_argument("--n_per_class", type=int, default=None, help="calibrate this many sampled images per class")
    add_device_arg(p)
    p.add_argument("--out", default=None, help="write the arrays here instead of data/<dataset>/<type>_vp/<record>/")
    add_debug_arg(p)
    p.set_defaults(func=run, accepts_extra=True)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..auxdata import build_aux_set, check_aux_request, vp_dir, write_vp_arrays
    from ..auxdata.shifts import shift_warning
    from ..gic.calibration import GIC
    from ..records import load_attack_record
    from ..utils.runtime import resolve_device, seed_everything
    from .defend import parse_extra_flags

    cli = parse_extra_flags(getattr(args, "extra", []))
    seed = int(cli.pop("random_seed", 0))
    gic = GIC.from_sources(args.dataset, args.yaml_path, cli)  # settings are checked before anything loads
    record = load_attack_record(args.result_file, args.bb_root, trust=args.trust_checkpoint,
                                dataset_dir=args.dataset_dir)
    dataset = args.dataset or record.clean_data
    if args.dataset is None:
        gic = GIC.from_sources(dataset, args.yaml_path, cli)
    device = resolve_device(args.device or "auto")
    check_aux_request(record, args.reserved_type, n_per_class=args.n_per_class)  # before the victim is built
    seed_everything(seed)
    victim = record.build_model().to(device)
    ratio = args.ratio if args.n_per_class is None else None
    aux = build_aux_set(record, args.reserved_type, ratio=ratio, n_per_class=args.n_per_class,
                        seed=seed, victim=victim, device=device)
    gic.fit(victim, aux, device=device, seed=seed)
    calibrated = gic.transform(aux, device)
    out = Path(args.out) if args.out else vp_dir(Path(record.bb_root) / args.dataset_path / dataset,
                                                 args.reserved_type, record.name)
    write_vp_arrays(out, calibrated.images, calibrated.labels, num_classes=record.num_classes)
    print(f"wrote {len(calibrated)} calibrated images of {args.reserved_type} to {out}")
    print(f"  {gic.describe()}")
    if shift_warning(args.reserved_type):
        print(f"  WARNING: {shift_warning(args.reserved_type)}")
    print(f"  use it with --reserved_type {args.reserved_type}_vp (ours or BackdoorBenchER's defenses)")
    return 0
