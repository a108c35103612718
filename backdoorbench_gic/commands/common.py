"""Argument groups several subcommands share, with BackdoorBench's flag names."""
from __future__ import annotations

import argparse


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


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
