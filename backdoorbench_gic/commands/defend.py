"""``bbgic defend`` (and ``run_defense.py`` with flags): one defense on one record, BackdoorBench-style.

Besides the named flags, any config key of the chosen defense can be given as ``--key value`` (or
``--key=value``; a bare ``--flag`` means true); the defense's config dataclass validates and types it, so an
unknown key is an error that names it. ``--defense sau --help`` lists sau's keys, their types and defaults.
"""
from __future__ import annotations

import argparse

from .common import add_config_help, add_debug_arg, add_device_arg


def add_defense_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--result_file", required=True, help="record folder name under <bb_root>/record/, or a path")
    p.add_argument("--defense", required=True, help="registered defense name (bbgic list defense)")
    p.add_argument("--yaml_path", default=None, help="yaml overriding defense_configs/<defense>/<dataset>.yaml")
    p.add_argument("--dataset", default=None, help="dataset name (default: the record's clean_data)")
    add_device_arg(p, from_config=True)
    p.add_argument("--bb_root", default=None, help="BackdoorBench root (default: the folder above record/)")
    p.add_argument("--reserved_type", default=None, help="auxiliary data type: train, reserved, reserved_noise, ...")
    p.add_argument("--n_per_class", type=int, default=None, help="auxiliary images per class (instead of --ratio)")
    p.add_argument("--output_dir", default=None, help="write results here instead of <record>/defense/<name>/<variant>")
    p.add_argument("--variant", default=None, help="output sub-folder name (default: yaml basename or <dataset>_<type>)")
    p.add_argument("--monitor_every", type=int, default=0,
                   help="opt-in: evaluate on the test sets every N epochs for the CSV (default 0: only the final "
                        "row has test metrics; each monitored epoch costs one test evaluation)")
    p.add_argument("--aux_option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the auxiliary source (repeatable), e.g. noise_wrap=true")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load .pt files with weights_only=False (only for files you made or trust)")
    p.add_argument("--dataset_dir", default=None, help="folder of the clean data, overriding the record's data_path")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--probes", default=None, metavar="refresh,retune",
                   help="post-purification probes on the victim and the purified model: refresh (ASR-refresh), "
                        "retune (P-ASR, with a clean control); README, 'Reading the results'")
    p.add_argument("--probe_option", action="append", default=[], metavar="KEY=VALUE",
                   help="probe setting (repeatable), e.g. retune.epochs=3 or control.model=clean_model.pth")


def parse_extra_flags(extra: list[str]) -> dict[str, object]:
    """``--key value`` / ``--key=value`` / bare ``--flag`` pairs into a dict of strings (typed later)."""
    out: dict[str, object] = {}
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or len(tok) <= 2:
            raise ValueError(f"unexpected argument {tok!r}; config keys are given as --key value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            value = extra[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        out[key.replace("-", "_")] = value
    return out


def parse_options(items: list[str]) -> dict[str, object]:
    """``--aux_option KEY=VALUE`` items (the library's one KEY=VALUE parser)."""
    from ..config import parse_key_values

    return parse_key_values(items, "--aux_option")


def request_from_args(args: argparse.Namespace, extra: list[str]):
    from ..config import parse_key_values
    from ..pipeline import DefenseRequest
    from ..probes import parse_probes

    overrides = parse_extra_flags(extra)
    if args.reserved_type is not None:
        overrides["reserved_type"] = args.reserved_type
    return DefenseRequest(
        result_file=args.result_file, defense=args.defense, bb_root=args.bb_root, dataset=args.dataset,
        yaml_path=args.yaml_path, overrides=overrides, device=args.device, output_dir=args.output_dir,
        variant=args.variant, n_per_class=args.n_per_class, aux_options=parse_options(args.aux_option),
        monitor_every=args.monitor_every, trust_checkpoint=args.trust_checkpoint, dataset_dir=args.dataset_dir,
        progress=False if args.no_progress else None,
        probes=parse_probes(getattr(args, "probes", None)),
        probe_options=parse_key_values(getattr(args, "probe_option", []), "--probe_option"),
    )


def format_row(row: dict) -> str:
    """One run in percent (the tidy row keeps fractions): before -> after for C-Acc, ASR and RA, then DER and RIR
    (50 % = no change; README, "Reading the results")."""
    return (f"{row['defense']} on {row['attack']} with {row['aux_type']} ({row['aux_size']} images): "
            f"C-Acc {row['acc_before']:.2%} -> {row['acc_after']:.2%}, ASR {row['asr_before']:.2%} -> "
            f"{row['asr_after']:.2%}, RA {row['ra_before']:.2%} -> {row['ra_after']:.2%}, DER {row['der']:.2%}, "
            f"RIR {row['rir']:.2%} ({row['wall_seconds']:.1f} s on {row['device']})")


def format_gic_summary(values: dict, prefix: str = "extra_") -> str | None:
    """The GIC fit's summary line, as ``bbgic calibrate`` prints it, from a run's tidy row; None without GIC."""
    from ..keys import gic_summary_line

    return gic_summary_line(values, prefix)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("defend", help="run one purification defense on one attack record", add_help=False,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_help(p)
    add_defense_args(p)
    add_debug_arg(p)
    p.set_defaults(func=run, accepts_extra=True)
    return p


def run(args: argparse.Namespace) -> int:
    from ..pipeline import output_dir, run_defense
    from ..records import resolve_record_dir

    req = request_from_args(args, getattr(args, "extra", []))
    row = run_defense(req)
    print(format_row(row))
    if row.get("aux_warning"):
        print(f"  WARNING: {row['aux_warning']}")
    summary = format_gic_summary(row)
    if summary:
        print(f"  {summary}")
    from ..probes import probe_line

    probes = probe_line(row)
    if probes:
        print(f"  {probes}")
    out = output_dir(req, resolve_record_dir(req.result_file, req.bb_root), row["defense"], row["dataset"],
                     row["aux_type"])
    print(f"wrote the purified model (defense_result.pt), its CSVs, plots, result.json and log/ to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry for run_defense.py."""
    p = argparse.ArgumentParser(prog="run_defense.py", description=__doc__, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_help(p)
    add_defense_args(p)
    add_debug_arg(p)
    from ..cli import plain_help, report_error

    args, extra = plain_help(p).parse_known_args(argv)
    args.extra = extra
    from ..utils.logs import console_logging

    console_logging()
    try:
        return run(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        if args.debug:
            raise
        return report_error("run_defense.py", exc)
