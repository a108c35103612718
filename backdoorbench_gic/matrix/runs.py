"""Running a matrix spec for a benchmark: make the splits its generated victims need, run it (resumable), and
collect the finished cells. (The reading of finished cells is :mod:`backdoorbench_gic.analysis`, one layer
below: analysis never runs a matrix.)"""
from __future__ import annotations

import time

from .report import collect_results
from .runner import run_matrix
from .spec import load_spec


def ensure_splits(spec) -> None:
    """Make every ``<ds>_split_<pct>_seed_<s>`` that a generated attack of ``spec`` needs (BackdoorBenchER's layout)."""
    from ..auxdata import make_split
    from ..data.specs import SPLIT_RE

    for a in spec.attacks:
        m = SPLIT_RE.match(str((a.generate or {}).get("dataset", "")))
        if m and not (spec.bb_root / "data" / m.group(0)).is_dir():
            make_split(m["base"], int(m["pct"]) / 100.0, int(m["seed"]), dataset_path="./data", bb_root=spec.bb_root)


def run_spec(spec_path: str, report_only: bool, executor_overrides: dict | None = None):
    """Load a matrix spec and, unless ``report_only``, make its missing splits and run it (resumable); then
    collect the finished cells. Returns (spec, results, seconds this invocation ran)."""
    spec = load_spec(spec_path)
    t0 = time.time()
    if not report_only:
        ensure_splits(spec)
        print(f"matrix: {run_matrix(spec, executor_overrides).counts}")
    return spec, collect_results(spec.output_root), time.time() - t0
