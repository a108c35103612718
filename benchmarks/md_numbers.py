"""Did a rewrite of a Markdown file keep its numbers? Extracts every number of the old and the new text (signed
where a sign stands before it, thousands separators joined: 2,850; not the digits inside names such as cnn16 or
dates' day parts read as negatives) and checks, as multisets, that the new text holds every number of the old one
as often as the old did, and that every number the new text adds is one the old text had somewhere (a summary or a
headline may repeat a figure, never invent one).

    python benchmarks/md_numbers.py --old 4c589ad:BENCHMARKS.md --new BENCHMARKS.md   # a git revision or a file

Exit status 0 when both hold; the report lists what is missing or new either way.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

NUMBER = re.compile(r"(?<![\w.])(?:[-+\u2212](?=\d))?\d+(?:,\d{3})*(?:\.\d+)?")


def numbers(text: str) -> Counter:
    """Every number in ``text``, as written (a Unicode minus read as '-'), counted."""
    return Counter(m.group(0).replace("\u2212", "-") for m in NUMBER.finditer(text))


def compare(old: str, new: str) -> tuple[Counter, Counter]:
    """(numbers of ``old`` that ``new`` holds fewer times than ``old`` does, with how many are missing; numbers
    ``new`` holds that ``old`` never had)."""
    a, b = numbers(old), numbers(new)
    return a - b, Counter({k: v for k, v in (b - a).items() if k not in a})


def read(source: str) -> str:
    """A file, or ``REV:PATH`` from git."""
    if Path(source).is_file():
        return Path(source).read_text(encoding="utf-8")
    rev, _, path = source.partition(":")
    return subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="the text before the rewrite: a file or REV:PATH")
    p.add_argument("--new", required=True, help="the text after it: a file or REV:PATH")
    args = p.parse_args(argv)
    old, new = read(args.old), read(args.new)
    missing, invented = compare(old, new)
    print(f"{args.old}: {sum(numbers(old).values())} numbers ({len(numbers(old))} distinct); "
          f"{args.new}: {sum(numbers(new).values())} ({len(numbers(new))} distinct)")
    print(f"old numbers missing from the new text: {sum(missing.values())}"
          + (" - " + ", ".join(f"{k} (x{v})" for k, v in sorted(missing.items())) if missing else ""))
    print(f"numbers new to the text: {sum(invented.values())}"
          + (" - " + ", ".join(f"{k} (x{v})" for k, v in sorted(invented.items())) if invented else ""))
    return 1 if missing or invented else 0


if __name__ == "__main__":
    sys.exit(main())
