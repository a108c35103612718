"""Benchmark scripts are clients of the library: none edits sys.path or imports a sibling script, and the
reports that keep their per-cell data regenerate from it identically but for the run's date and command."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_scripts_import_only_the_library(script):
    source = script.read_text()
    assert "sys.path" not in source
    siblings = {p.stem for p in SCRIPTS}
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not [n for n in names if n.split(".")[0] in siblings], f"{script.name} imports a sibling: {names}"


def regenerate(tmp_path: Path, stored_md: Path, csv: Path, argv: list[str]) -> list[tuple[str, str]]:
    """Run the script's --report_only on a copy of ``csv``; the (new, stored) lines that differ."""
    shutil.copy(csv, tmp_path / csv.name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    new = (tmp_path / stored_md.name).read_text().splitlines()
    old = stored_md.read_text().splitlines()
    assert len(new) == len(old)
    return [(a, b) for a, b in zip(new, old) if a != b]


DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d")
MACHINE = re.compile(r"\(\d{4}-\d\d-\d\d \d\d:\d\d; .*?\)(?=\. )")  # (date; machine, n cores). 


def test_bn_restat_report_regenerates(tmp_path):
    md = BENCH / "results" / "bn_restat_efficacy-cpu-5pct.md"
    differ = regenerate(tmp_path, md, md.with_suffix(".csv"),
                        ["benchmarks/bn_restat.py", "--report_only", "--spec", "benchmarks/efficacy_5pct.yaml",
                         "--out", str(tmp_path / md.name)])
    assert len(differ) <= 1 and all(DATE.sub("", a) == DATE.sub("", b) for a, b in differ)


def test_gic_budget_report_regenerates(tmp_path):
    md = BENCH / "results" / "gic_budget_efficacy-cpu-5pct.md"
    differ = regenerate(tmp_path, md, md.with_suffix(".csv"),
                        ["benchmarks/gic_budget.py", "--report_only", "--seeds", "0", "--out", str(tmp_path)])
    # the header names the command (here with --out), the date and the machine that wrote the report (not
    # necessarily the one that measured); everything after them, and every table line, is the stored one
    assert len(differ) == 1 and differ[0][0].startswith("`python benchmarks/gic_budget.py --report_only --seeds 0")
    assert MACHINE.split(differ[0][0], 1)[1] == MACHINE.split(differ[0][1], 1)[1]
