"""Benchmark scripts are clients of the library: none edits sys.path or imports a sibling script (the frozen ones
under benchmarks/archive/ included), and the reports that keep their per-cell data regenerate from it identically but
for the run's date and command."""
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
SCRIPTS = sorted(BENCH.glob("*.py")) + sorted(BENCH.glob("archive/*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(BENCH)) for p in SCRIPTS])
def test_scripts_import_only_the_library(script):
    source = script.read_text()
    assert "sys.path" not in source
    siblings = {p.stem for p in SCRIPTS}
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not [n for n in names if n.split(".")[0] in siblings | {"archive", "benchmarks"}], \
            f"{script.name} imports a sibling: {names}"
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{script.name}: relative import {names}"


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
# (date; machine, n cores), the machine's name may hold parentheses of its own: Intel(R) Xeon(R)
MACHINE = re.compile(r"\(\d{4}-\d\d-\d\d \d\d:\d\d; (?:[^()]|\([^()]*\))*\)")


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


def test_archived_scripts_are_marked_frozen():
    archived = sorted(BENCH.glob("archive/*.py"))
    assert archived, "benchmarks/archive/ holds no script"
    index = (BENCH / "archive" / "README.md").read_text()
    for script in archived:
        assert script.read_text().startswith('"""FROZEN'), script.name
        assert f"`{script.name}`" in index, f"benchmarks/archive/README.md does not say what superseded {script.name}"


def test_md_numbers_by_hand(tmp_path):
    old = tmp_path / "old.md"
    old.write_text("FT recovers 21 % (ASR +8.4 pts) of 2,850 images on cnn16 (2026-11-29), dDER -0.5; 21 % again\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(new_text: str) -> subprocess.CompletedProcess:
        new = tmp_path / "new.md"
        new.write_text(new_text)
        return subprocess.run([sys.executable, "benchmarks/md_numbers.py", "--old", str(old), "--new", str(new)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    # numbers: 21 (x2), +8.4, 2,850, 2026, 11, 29, -0.5; cnn16's digits are part of a name
    moved = run("## Headline\n\n21 % recovered.\n\nOn cnn16 (2026-11-29): 21 %, ASR +8.4, 2,850 images, -0.5\n")
    assert moved.returncode == 0 and "numbers (7 distinct)" in moved.stdout, moved.stdout
    changed = run("21 % recovered; 21 %, ASR +8.5 on 2,850 images, 2026-11-29, -0.5, 16\n")
    assert changed.returncode == 1
    assert "missing from the new text: 1 - +8.4 (x1)" in changed.stdout and "new to the text: 2 - +8.5 (x1), 16 (x1)" \
        in changed.stdout, changed.stdout
    assert "missing from the new text: 1 - 21 (x1)" in run("21 %, +8.4, 2,850, 2026-11-29, -0.5\n").stdout
