"""``bbgic calibrate``: Guided Input Calibration alone. Fit g through the frozen victim on an auxiliary set and
write the calibrated set in BackdoorBenchER's ``_vp`` format, ``data/<dataset>/<type>_vp/<result_file>/images.npy``
(float32 N x H x W x C in [0,1]) and ``labels.npy`` (int64), so their own defenses run on it with
``--reserved_type <type>_vp`` (and ours read it back the same way).

By default the whole pool of the auxiliary type is calibrated (BackdoorBenchER's loader then applies its own
ratio rule to the arrays); ``--ratio`` / ``--n_per_class`` calibrate a sampled subset instead. GIC keys
(delta, family, obj_bn, gic_steps, ...) come from ``defense_configs/gic/<dataset>.yaml`` < ``--yaml_path`` <
``--key value`` flags.
"""
from __future__ import annotations

import argparse

from .common import add_debug_arg, add_record_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="fit GIC on an auxiliary set and export BackdoorBenchER _vp arrays",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_record_args(p)
    p.add_argument("--reserved_type", required=True, help="the auxiliary type to calibrate (reserved_noise, ...)")
    p.add_argument("--dataset", default=None, help="dataset name for the output path (default: the record's)")
    p.add_argument("--dataset_path", default="./data", help="BackdoorBench's data folder, relative to --bb_root")
    p.add_argument("--yaml_path", default=None, help="GIC settings overriding defense_configs/gic/<dataset>.yaml")
    p.add_argument("--ratio", type=float, default=None, help="calibrate ratio x |train| sampled images, not the pool")
    p.add_argument("--n_per_class", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the arrays here instead of data/<dataset>/<type>_vp/<record>/")
    add_debug_arg(p)
    p.set_defaults(func=run, accepts_extra=True)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..auxdata import build_aux_set, vp_dir, write_vp_arrays
    from ..gic.defense import GICDefense
    from ..records import load_attack_record
    from ..utils.runtime import resolve_device, seed_everything
    from .defend import parse_extra_flags

    record = load_attack_record(args.result_file, args.bb_root, trust=args.trust_checkpoint,
                                dataset_dir=args.dataset_dir)
    dataset = args.dataset or record.clean_data
    cli = parse_extra_flags(getattr(args, "extra", []))
    cli["base"] = cli.get("base", "ft")  # irrelevant here, but the config names one
    if args.device:
        cli["device"] = args.device
    gic = GICDefense.from_sources(dataset, args.yaml_path, cli)
    cfg = gic.config
    device = resolve_device(cfg.device)
    seed_everything(cfg.random_seed)
    victim = record.build_model().to(device)
    ratio = args.ratio if args.n_per_class is None else None
    aux = build_aux_set(record, args.reserved_type, ratio=ratio, n_per_class=args.n_per_class,
                        seed=cfg.random_seed, victim=victim, device=device)
    calibrated, info = gic.calibrate(victim, aux, device=device)
    out = Path(args.out) if args.out else vp_dir(Path(record.bb_root) / args.dataset_path / dataset,
                                                 args.reserved_type, record.name)
    write_vp_arrays(out, calibrated.images, calibrated.labels, num_classes=record.num_classes)
    print(f"wrote {len(calibrated)} calibrated images of {args.reserved_type} to {out}")
    print(f"  delta {info.get('gic_delta', cfg.delta):.4f} ({info.get('gic_delta', 0) * 255:.1f}/255), "
          f"D_BN {info.get('bn_div_before', float('nan')):.4f} -> {info.get('bn_div_after', float('nan')):.4f}, "
          f"drift: class {info['drift_class']} gets {info['drift_share']:.1%} of predictions"
          + ("  (WARNING: concentrated)" if info.get("drift_flag") else ""))
    print(f"  use it with --reserved_type {args.reserved_type}_vp (ours or BackdoorBenchER's defenses)")
    return 0
