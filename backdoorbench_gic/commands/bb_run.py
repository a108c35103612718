"""``bbgic bb-run``: run one of BackdoorBench's (or BackdoorBenchER's) own scripts, unmodified, on current torch,
optionally with Guided Input Calibration in front of the clean data it draws.

  cd BackdoorBench && bbgic bb-run defense/ft.py --result_file badnet_0_1 --yaml_path ./config/defense/ft/cifar10.yaml \\
      --dataset cifar10 --device cuda:0 --gic [--delta 0.0314 --gic_steps 100 --gic_yaml my_gic.yaml]

Every argument the runner does not own goes to their script as given. The runner owns --bb_root, --gic,
--gic_yaml, --gic_device, --no_numpy_compat, --cuda_on_cpu and, with --gic, GIC's keys (delta, family, norm, gic_steps, ...,
see defense_configs/gic/). It reads, without removing them, --result_file, --yaml_path, --dataset, --ratio,
--random_seed, --index, --device and (BackdoorBenchER) --reserved_type. g is fitted on the images their script
trains on: their draw is intercepted before training (upstream's choose_index: the --index file or their seeded
draw; BackdoorBenchER's get_reserved_data: the subset it returns), and the fit line says which images it used. A
script that reads clean training images before any draw gets g fitted on our own draw with its ratio and seed.

Their torch.load goes through our allow-list loader (weights_only=True plus the numpy types of a record; a pickle
needing anything else is refused, naming it, and none of it runs). Test and poisoned data are never calibrated.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHARED = ("result_file", "yaml_path", "dataset", "ratio", "random_seed", "index", "device", "reserved_type")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bb-run", help="run a BackdoorBench defense script unmodified: safe record loading, optional GIC",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("script", help="their script, relative to the checkout (defense/ft.py)")
    p.add_argument("--bb_root", default=None, help="the BackdoorBench / BackdoorBenchER checkout (default: here)")
    p.add_argument("--gic", action="store_true", help="calibrate the clean training images their defense draws")
    p.add_argument("--gic_yaml", default=None, help="GIC settings over defense_configs/gic/<dataset>.yaml")
    p.add_argument("--gic_device", default=None, help="device for fitting g (default: their --device / yaml device)")
    p.add_argument("--no_numpy_compat", action="store_true",
                   help="do not define the numpy aliases numpy 2 removed (np.infty, np.float, ...) for the run")
    p.add_argument("--cuda_on_cpu", action="store_true",
                   help="on a machine without CUDA, make the tensors their code asks for on CUDA on the CPU "
                        "(device= of torch's tensor factories, .cuda()): for scripts that hard-code CUDA (i-bau.py)")
    p.set_defaults(func=run, accepts_extra=True)
    return p


def split_gic_flags(argv: list[str], keys: set[str]) -> tuple[dict[str, str], list[str]]:
    """(GIC ``--key value`` pairs, everything else in order)."""
    ours: dict[str, str] = {}
    theirs: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name = tok[2:].split("=", 1)[0].replace("-", "_") if tok.startswith("--") else None
        if name in keys:
            if "=" in tok:
                ours[name] = tok.split("=", 1)[1]
                i += 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                ours[name] = argv[i + 1]
                i += 2
            else:
                ours[name] = "true"
                i += 1
        else:
            theirs.append(tok)
            i += 1
    return ours, theirs


def flag_value(argv: list[str], name: str) -> str | None:
    """The value argparse would give ``--name`` (the last occurrence wins), without consuming it."""
    value = None
    for i, tok in enumerate(argv):
        if tok == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(f"--{name}="):
            value = tok.split("=", 1)[1]
    return value


def their_settings(argv: list[str], root: Path, script: Path) -> dict[str, object]:
    """The shared keys as their defense will see them: its yaml (--yaml_path, else config/defense/<name>/config.yaml)
    overlaid by the command line."""
    import yaml

    settings: dict[str, object] = {}
    yaml_path = flag_value(argv, "yaml_path")
    path = Path(yaml_path) if yaml_path else root / "config" / "defense" / script.stem / "config.yaml"
    if not path.is_absolute():
        path = root / path
    if path.is_file():
        with open(path) as fh:
            settings.update({k: v for k, v in (yaml.safe_load(fh) or {}).items() if k in SHARED})
    for key in SHARED:
        v = flag_value(argv, key)
        if v is not None:
            settings[key] = v
    return settings


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import bbrun
    from ..auxdata import build_aux_set
    from ..auxdata.shifts import shift_warning
    from ..checkpoint import UntrustedCheckpointError
    from ..config import config_keys
    from ..gic.fit import GICConfig
    from ..records import load_attack_record

    root = Path(args.bb_root or ".").resolve()
    try:
        bbrun.detect_checkout(root)
    except ValueError as exc:
        where = "--bb_root names" if args.bb_root else "the current directory is"
        raise bbrun.BBRunError(f"{exc}. bb-run runs their scripts from their checkout, and {where} not one: cd into "
                               "your checkout or pass --bb_root") from None
    gic_cli, theirs = split_gic_flags(list(getattr(args, "extra", [])), set(config_keys(GICConfig)))
    if gic_cli and not args.gic:
        raise ValueError(f"GIC setting(s) {', '.join('--' + k for k in gic_cli)} given without --gic")
    if not args.gic and (args.gic_yaml or args.gic_device):
        raise ValueError("--gic_yaml / --gic_device given without --gic")
    calibrator = shape = None
    reserved_type = flag_value(theirs, "reserved_type")
    if args.gic:
        flavour = bbrun.detect_checkout(root)
        script = bbrun.resolve_script(args.script, root)
        s = their_settings(theirs, root, script)
        reserved_type = s.get("reserved_type")
        if flavour != "BackdoorBenchER" and reserved_type not in bbrun.TRAIN_TYPES:
            raise ValueError(f"--reserved_type {reserved_type}: upstream BackdoorBench has no reserved types; its "
                             "defenses draw the clean training set, which GIC calibrates without the flag")
        if reserved_type and "_vp" in str(reserved_type):
            raise ValueError(f"--reserved_type {reserved_type} is already calibrated (bbgic calibrate's arrays); "
                             "drop --gic, or name the uncalibrated type")
        if not s.get("result_file"):
            raise ValueError("--result_file is required")
        try:
            record = load_attack_record(str(s["result_file"]), root)
        except UntrustedCheckpointError as exc:
            raise bbrun.refusal(exc) from None
        ratio = float(s.get("ratio") or 0.05)
        seed = int(s.get("random_seed") or 0)
        index = s.get("index") or None
        device = args.gic_device or s.get("device") or "auto"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # their yaml's default; their script meets it with its own message

        def fit(images):
            g, described, _ = bbrun.fit_gic(record, images, dataset=s.get("dataset") or None,
                                            yaml_path=args.gic_yaml, settings=gic_cli, seed=seed, device=device)
            note = shift_warning(str(reserved_type or ""))
            return g, described + (f". WARNING: {note}" if note else "")

        def fallback():
            return build_aux_set(record, str(reserved_type or "train"), ratio=None if index else ratio, seed=seed,
                                 index_file=Path(root, str(index)) if index else None, device="cpu")

        from ..gic.calibration import GIC
        from ..gic.defense import DEFENSE_KEYS

        # bad settings fail now, read as fit_gic reads them (a gic defense yaml's own keys skipped)
        GIC.from_sources(s.get("dataset") or record.clean_data, args.gic_yaml, gic_cli, skip=DEFENSE_KEYS)
        calibrator = bbrun.DrawnFit(record, fit, Path(args.script).name, fallback,
                                    announce=lambda line: print(line, flush=True))
        h, w, c = record.img_size
        shape = (c, h, w)
    try:
        report = bbrun.run_script(args.script, theirs, root, calibrator=calibrator, image_shape=shape,
                                  reserved_type=reserved_type, numpy_aliases=not args.no_numpy_compat,
                                  cuda_to_cpu=args.cuda_on_cpu)
    except bbrun.BBRunError:
        raise
    except Exception:  # their script failed: its own traceback is what the user needs
        import traceback

        traceback.print_exc()
        print(f"bbgic bb-run: {args.script} failed (traceback above, from their code)", file=sys.stderr)
        return 1
    print(f"bb-run: {report.script.name} ({report.flavour}) exited with {report.exit_code}; "
          f"{len(report.loads)} torch.load call(s) through the allow-list")
    for line in report.fits:
        print(f"  {line}")
    for where, n in report.calibrated:
        print(f"  GIC calibrated {where} ({n} images)")
    if report.numpy_aliases:
        print(f"  numpy 2 compatibility: defined {', '.join(report.numpy_aliases)} for the run")
    if report.cuda_on_cpu is not None:
        print(f"  CUDA on the CPU: {report.cuda_on_cpu} CUDA request(s) of their code served on the CPU")
    return report.exit_code
