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
import re
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


_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Strip reST markup (``literal``, :mod:`name`) from ``parser``'s description, epilog and every argument's and
    subcommand's help, recursively: docstrings double as ``--help`` text, where the markup would show literally."""
    def plain(text):
        return _RST_ROLE.sub(r"\1", text).replace("``", "") if isinstance(text, str) else text

    parser.description, parser.epilog = plain(parser.description), plain(parser.epilog)
    for action in parser._actions:
        action.help = plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = plain(choice.help)
            for sub in set(action.choices.values()):
                plain_help(sub)
    return parser


def startup_check(prog: str) -> int | None:
    """The one check of the installation every command shares: a torch/torchvision build mismatch is reported
    here, once, with the reinstall command (:mod:`backdoorbench_gic.environment`); returns the exit code then."""
    from .environment import TorchBuildMismatch, check_torch_build

    try:
        check_torch_build()
    except TorchBuildMismatch as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return None


def report_error(prog: str, exc: BaseException) -> int:
    """Print ``exc`` as ``<prog>: error: ...`` (a torch/torchvision build mismatch as such, with its fix)."""
    from .environment import as_build_mismatch

    print(f"{prog}: error: {as_build_mismatch(exc) or exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = plain_help(build_parser(chosen_command(argv)))
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    from .utils.logs import console_logging

    console_logging()
    prog = f"bbgic {args.command}"
    code = startup_check(prog)
    if code is not None:
        return code
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        return report_error(prog, exc)
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
