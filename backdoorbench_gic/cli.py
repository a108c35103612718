"""``bbgic``: one subcommand per module in :mod:`backdoorbench_gic.commands`; this file only assembles them.

It starts fast: a command module imports torch and the registries inside its ``run`` function, never at import
time, and ``add_parser`` stays cheap. A module whose parser is expensive to build (``attack`` generates its flags
from every attack's config dataclass) declares ``COMMANDS = {name: one-line help}``; its parser is then built only
when that subcommand is the one being run, and ``bbgic --help`` lists it from the declaration.
"""
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


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` runs (its first token that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``bbgic`` parser. Modules that declare ``COMMANDS`` get their full parser only for ``command``; the
    others list a placeholder with their help line (``command=None`` builds the placeholders only)."""
    parser = argparse.ArgumentParser(
        prog="bbgic",
        description="BackdoorBench plugin: records, auxiliary-data variants, Guided Input Calibration, defenses. "
                    "`bbgic <command> --help` describes a command; `bbgic list NAME` a component's config keys.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for module in command_modules():
        mod = importlib.import_module(module)
        declared: dict[str, str] | None = getattr(mod, "COMMANDS", None)
        if declared is not None and command not in declared:
            for name, line in declared.items():
                sub.add_parser(name, help=line, description=f"{line} (run `bbgic {name} --help` for its flags)")
            continue
        if hasattr(mod, "add_parser"):
            mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(chosen_command(argv))
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
