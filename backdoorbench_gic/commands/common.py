"""Argument groups several subcommands share, with BackdoorBench's flag names.

One flag style: BackdoorBench's underscores (``--bb_root``, ``--result_file``). A flag we once spelled with
hyphens keeps that spelling as an alias (:func:`flag_names`). One device default: ``auto`` (CUDA when present,
else the CPU).
"""
from __future__ import annotations

import argparse

DEVICE_HELP = "auto (default: CUDA when present, else the CPU), cpu, cuda or cuda:N"


def flag_names(name: str) -> list[str]:
    """``--some_flag`` plus its hyphenated spelling ``--some-flag`` (an alias that older commands accepted)."""
    flag = f"--{name}"
    return [flag] if "_" not in name else [flag, f"--{name.replace('_', '-')}"]


def add_record_args(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        parser.add_argument("result_file", help="record folder (or its name under <bb_root>/record/)")
    else:
        parser.add_argument("--result_file", required=True, help="record folder name under <bb_root>/record/, or a path")
    parser.add_argument("--bb_root", default=None,
                        help="BackdoorBench root the record's relative paths start from "
                             "(default: the folder above record/, else the current directory)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load .pt files with weights_only=False (only for files you made or trust)")
    parser.add_argument("--dataset_dir", default=None,
                        help="folder of the clean data, overriding the record's data_path")


def add_device_arg(parser: argparse.ArgumentParser, from_config: bool = False) -> None:
    """``--device`` with the one default, ``auto``. ``from_config``: the command builds a config (defend,
    calibrate), whose ``device`` key already defaults to ``auto``; leaving the flag out then keeps a yaml's value."""
    if from_config:
        parser.add_argument("--device", default=None,
                            help=f"{DEVICE_HELP}; left out: the yaml's device key, which defaults to auto")
    else:
        parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


class ConfigHelp(argparse.Action):
    """``-h/--help`` that also lists the config keys and defaults of the component named before it, e.g.
    ``bbgic defend --defense sau --help`` (the keys come from the component's config dataclass, so a new defense
    needs no edit here). Without a name it says how to ask."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None,
                 kind: str = "defense", name_dest: str = "defense"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or f"show this help; after --{name_dest} NAME also that {kind}'s config keys")
        self.kind = kind
        self.name_dest = name_dest

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        name = getattr(namespace, self.name_dest, None)
        if name:
            from .listing import describe

            print()
            print(describe(name, kinds=(self.kind,), dataset=getattr(namespace, "dataset", None)))
        else:
            print(f"\nconfig keys: put --{self.name_dest} NAME before --help (or run `bbgic list NAME`) to list "
                  f"that {self.kind}'s keys and defaults; any of them is given as --key value")
        parser.exit()


def add_config_help(parser: argparse.ArgumentParser, kind: str = "defense", name_dest: str = "defense") -> None:
    """Replace the parser's ``-h/--help`` with :class:`ConfigHelp` (build the parser with ``add_help=False``)."""
    parser.add_argument("-h", "--help", action=ConfigHelp, kind=kind, name_dest=name_dest)
