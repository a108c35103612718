"""``bbgic matrix run|status|report``: leaderboard-style matrices of purification runs."""
from __future__ import annotations

import argparse

from .common import add_debug_arg, flag_names


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("matrix", help="run, follow and report attack x defense x aux x GIC x seed matrices")
    msub = p.add_subparsers(dest="matrix_command", metavar="<run|status|report|validate>")
    msub.required = True

    r = msub.add_parser("run", help="run every cell that is not done yet (resumable)")
    r.add_argument("spec", help="matrix spec YAML")
    r.add_argument("--executor", choices=["local", "ray"], default=None, help="override the spec's executor kind")
    r.add_argument("--workers", type=int, default=None, help="local: worker processes (default: one per GPU, else 1)")
    r.add_argument(*flag_names("ray_address"), dest="ray_address", default=None,
                   help="ray: join this cluster (e.g. auto or host:6379); default: start a local Ray")
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

    v = msub.add_parser("validate", help="check the spec (names, configs, records) without running anything")
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
    if overrides.get("kind") and overrides["kind"] != spec.executor.get("kind", "local"):
        spec.executor = {"kind": overrides.pop("kind")}
    else:
        overrides.pop("kind", None)
    summary = run_matrix(spec, overrides, max_cells=args.max_cells)
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
    from ..matrix import load_spec, validate_spec

    problems = validate_spec(load_spec(args.spec))
    for p in problems:
        print(f"PROBLEM: {p}")
    print("VALID" if not problems else "INVALID")
    return 0 if not problems else 1
