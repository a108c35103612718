"""``bbgic``: one subcommand per module in :mod:`backdoorbench_gic.commands`; this file only assembles them."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def command_modules() -> list[str]:
    """Every module in ``backdoorbench_gic.commands`` that defines ``add_parser(subparsers)``; a new subcommand
    is a new module there, with no edit here."""
    from . import commands

    return sorted(f"{commands.__name__}.{m.name}" for m in pkgutil.iter_modules(commands.__path__)
                  if m.name != "common" and not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bbgic",
        description="BackdoorBench plugin: records, auxiliary-data variants, Guided Input Calibration, defenses.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for module in command_modules():
        mod = importlib.import_module(module)
        if hasattr(mod, "add_parser"):
            mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    from .utils.logs import console_logging

    console_logging()
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"bbgic {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
