"""``bbgic matrix run|status|report|validate``: leaderboard-style matrices of purification runs."""
from __future__ import annotations

import argparse

from .common import add_debug_arg, flag_names


DESCRIPTION = (
    "Leaderboard-style matrices of purification runs: a YAML spec names attacks, defenses, auxiliary types and "
    "sizes, seeds and with or without GIC (or named GIC variants); every combination is one cell. 'run' computes "
    "the cells that are not done (resumable: a killed run loses no stored cell), 'status' counts them, 'report' "
    "makes tables and plots, 'validate' runs every check a cell would run before building a model. Cells run on a "
    "local process pool (executor local: one worker per GPU, or --workers CPU processes) or as Ray tasks (executor "
    "ray: a local Ray, or an existing cluster with --ray_address). A cell is claimed while it runs, so two runs of "
    "one spec never compute it twice.")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("matrix", description=DESCRIPTION,
                       help="run, follow and report attack x defense x aux x GIC x seed matrices (local or Ray)")
    msub = p.add_subparsers(dest="matrix_command", metavar="<run|status|report|validate>")
    msub.required = True

    r = msub.add_parser("run", help="run every cell that is not done yet (resumable)")
    r.add_argument("spec", help="matrix spec YAML")
    r.add_argument("--executor", choices=["local", "ray"], default=None, help="override the spec's executor kind")
    r.add_argument("--workers", type=int, default=None, help="local: worker processes (default: one per GPU, else 1)")
    r.add_argument(*flag_names("ray_address"), dest="ray_address", default=None,
                   help="ray: join this cluster (e.g. auto or host:6379); default: start a local Ray")
    r.add_argument(*flag_names("ray_timeout"), dest="ray_timeout", type=float, default=None,
                   help="ray: seconds to wait for the cluster at --ray_address before giving up (default 30)")
    r.add_argument("--max_cells", type=int, default=None, help="run at most this many pending cells")
    add_debug_arg(r)
    r.set_defaults(func=run)

    s = msub.add_parser("status", help="done / running / failed / pending counts")
    s.add_argument("spec", help="matrix spec YAML")
    s.add_argument("-v", "--verbose", action="store_true", help="list running and pending cells too")
    add_debug_arg(s)
    s.set_defaults(func=status)

    rep = msub.add_parser("report", help="tables (CSV, Markdown, LaTeX) and plots from the finished cells")
    rep.add_argument("spec", help="matrix spec YAML")
    rep.add_argument("--out", default=None, help="folder for the report (default: <output_root>/report)")
    rep.add_argument("--no_plots", action="store_true", help="tables only, no PNG plots")
    add_debug_arg(rep)
    rep.set_defaults(func=report)

    v = msub.add_parser("validate", help="check the spec (names, configs, records, each cell's auxiliary request) "
                                         "without building a model")
    v.add_argument("spec", help="matrix spec YAML")
    add_debug_arg(v)
    v.set_defaults(func=validate)
    return p


def run(args: argparse.Namespace) -> int:
    from ..matrix import load_spec, matrix_status, render_status, run_matrix

    spec = load_spec(args.spec)
    overrides: dict = {}
    if args.executor:
        overrides["kind"] = args.executor
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.ray_address:
        overrides["address"] = args.ray_address
        overrides.setdefault("kind", "ray")
    if args.ray_timeout is not None:
        overrides["connect_timeout"] = args.ray_timeout
    if overrides.get("kind") and overrides["kind"] != spec.executor.get("kind", "local"):
        spec.executor = {"kind": overrides.pop("kind")}
    else:
        overrides.pop("kind", None)
    summary = run_matrix(spec, overrides, max_cells=args.max_cells)
    print(f"this run: {summary.line()}")
    if summary.counts.get("busy"):
        print(f"{summary.counts['busy']} cell(s) were claimed by another run ({', '.join(sorted(summary.owners))}) "
              "and left to it; `bbgic matrix status` follows them")
    print(render_status(spec, matrix_status(spec)))
    if summary.failures:
        print(f"{len(summary.failures)} job(s) failed this run; their tracebacks are under {spec.output_root / 'failures'}")
        return 1
    return 0


def status(args: argparse.Namespace) -> int:
    from ..matrix import load_spec, matrix_status, render_status

    spec = load_spec(args.spec)
    print(render_status(spec, matrix_status(spec), verbose=args.verbose))
    return 0


def report(args: argparse.Namespace) -> int:
    from ..matrix import load_spec, write_report

    spec = load_spec(args.spec)
    for p in write_report(spec.output_root, args.out, plots=not args.no_plots):
        print(p)
    return 0


def validate(args: argparse.Namespace) -> int:
    from ..matrix import load_spec, validate_matrix

    problems = validate_matrix(load_spec(args.spec))
    for p in problems:
        print(f"PROBLEM: {p}")
    print("VALID" if not problems else "INVALID")
    return 0 if not problems else 1
