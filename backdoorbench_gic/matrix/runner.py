"""``bbgic matrix run``, ``status`` and ``validate``: validate, generate missing records, run the cells that
are not done, and leave an account of each run (``<output_root>/runs/*.json``: which cells it computed, skipped or
lost), which :func:`audit_runs` reads to count cells computed more than once."""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from ..keys import Col
from ..results import TIDY_ROW_FILE
from ..utils.io import atomic_write_json, atomic_write_text
from .executors import RunSummary, make_executor
from .jobs import cell_payload
from .spec import MatrixSpec, validate_spec
from .store import CellStatus, CellStore, describe_claim

log = logging.getLogger(__name__)

RUNS_DIR = "runs"


class MatrixSpecError(ValueError):
    """The spec cannot run; every problem found is listed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the matrix spec cannot run:\n" + "\n".join(f"  - {p}" for p in problems))


def spec_dict(spec: MatrixSpec) -> dict[str, Any]:
    d = spec.to_dict()
    d["output_root"] = str(spec.output_root)
    d["bb_root"] = str(spec.bb_root)
    return d


def check_cells(spec: MatrixSpec, records: list[str] | None = None) -> list[str]:
    """The check a single run performs before it builds a model (:func:`~backdoorbench_gic.pipeline.check_request`:
    the auxiliary request against the record's dataset, the defense's config with the cell's overrides, the
    evaluation settings) for every cell whose record exists (only those of ``records`` when given). Cells that
    differ only in their seed are checked once. One problem per distinct message, with how many cells it stops."""
    from ..pipeline import check_request
    from ..records import load_attack_record

    loaded: dict[str, Any] = {}
    seen: set[tuple] = set()
    found: dict[str, list] = {}
    for part in spec.parts():
        for cell in part.cells():
            key = (cell.attack, cell.defense.label, cell.aux, cell.size, cell.gic, cell.variant)
            if key in seen or (records is not None and cell.attack not in records):
                continue
            seen.add(key)
            if cell.attack not in loaded:
                try:
                    loaded[cell.attack] = load_attack_record(spec.bb_root / "record" / cell.attack, spec.bb_root,
                                                             trust=spec.trust_checkpoint)
                except Exception:  # generated later (checked then), or missing or broken (validate_spec says so)
                    loaded[cell.attack] = None
            if loaded[cell.attack] is None:
                continue
            try:
                check_request(cell.request(part), loaded[cell.attack])
            except Exception as exc:
                found.setdefault(str(exc) or type(exc).__name__, []).append(cell)
    per_seed = len(spec.seeds)
    return [f"{len(cells) * per_seed} cell(s), e.g. {cells[0].describe()}: {msg}" for msg, cells in found.items()]


def validate_matrix(spec: MatrixSpec) -> list[str]:
    """Every problem that would stop a cell before its model is built: the spec's names, configs and records
    (:func:`validate_spec`), then each cell's single-run check (:func:`check_cells`). Empty: the spec can run."""
    problems = validate_spec(spec)
    for p in check_cells(spec):
        message = p.split(": ", 1)[1]
        if not any(q.endswith(": " + message) for q in problems):  # validate_spec said it already
            problems.append(p)
    return problems


def run_matrix(spec: MatrixSpec, executor_overrides: dict[str, Any] | None = None, validate: bool = True,
               max_cells: int | None = None) -> RunSummary:
    """Run every cell that is not done; failed cells are retried; done cells, and cells another live run has
    claimed, are skipped. A spec with named GIC variants runs each part (:meth:`~.spec.MatrixSpec.parts`) in its
    own folder, and each folder keeps an account of the run in ``runs/`` (:class:`_RunLog`)."""
    if validate:
        problems = validate_matrix(spec)
        if problems:
            raise MatrixSpecError(problems)
    executor = make_executor(spec.executor, **(executor_overrides or {}))
    executor.connect()  # an unreachable cluster fails here, before anything is written
    summary = RunSummary()
    for part in spec.parts():
        max_cells = _run_part(part, executor, max_cells, summary, validate)
    if summary.counts.get("busy"):
        log.warning("%d cell(s) skipped: claimed by another run (%s); `bbgic matrix status` follows them",
                    summary.counts["busy"], ", ".join(sorted(summary.owners)))
    return summary


def _run_part(spec: MatrixSpec, executor, max_cells: int | None, summary: RunSummary, validate: bool) -> int | None:
    """One folder's cells; returns how many of ``max_cells`` are left."""
    store = CellStore(spec.output_root)
    spec.output_root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec.output_root / "spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
    removed = store.clean_stale_staging()
    if removed:
        log.info("removed %d staging folders left by interrupted runs", removed)
    sd = spec_dict(spec)
    part_summary = RunSummary()
    run_log = _RunLog(spec, getattr(executor, "kind", "?"))

    def on_result(result: dict[str, Any]) -> None:
        summary.add(result)
        part_summary.add(result)
        run_log.write(part_summary)

    try:
        missing = [a for a in spec.attacks if a.generate is not None
                   and not (spec.bb_root / "record" / a.record / "attack_result.pt").is_file()]
        if missing:
            log.info("generating %d missing attack record(s)", len(missing))
            executor.run([{"kind": "attack", "record": a.record, "generate": a.generate, "spec": sd} for a in missing],
                         on_result, desc="attacks")
            still = [a.record for a in missing
                     if not (spec.bb_root / "record" / a.record / "attack_result.pt").is_file()]
            if still:
                raise RuntimeError(f"could not generate record(s) {', '.join(still)}: " + "; ".join(summary.failures))
            problems = check_cells(spec, [a.record for a in missing]) if validate else []
            if problems:  # the new records' cells get the single-run check before any cell runs
                raise MatrixSpecError(problems)

        todo = [c for c in spec.cells() if not store.is_done(c)]
        unprobed = _done_without_probes(spec, store)
        if unprobed:
            log.warning("%d finished cell(s) hold no %s probe(s), or hold them under other probe settings (they ran "
                        "before the spec's probes changed), and keep their rows as they are; delete them, or use a new "
                        "output_root, to probe them as the spec says: %s", len(unprobed),
                        ",".join(spec.probes), "; ".join(c.describe() for c in unprobed[:3]))
        if max_cells is not None:
            todo = todo[:max_cells]
        log.info("%d of %d cells to run", len(todo), len(spec.cells()))
        executor.run([cell_payload(c, sd) for c in todo], on_result, desc="cells")
    finally:
        run_log.write(part_summary, finished=True)
    return None if max_cells is None else max_cells - len(todo)


def _done_without_probes(spec: MatrixSpec, store: CellStore) -> list:
    """The finished cells whose row lacks one of the spec's probes, or holds them under other probe settings
    (probes are not part of a cell's identity)."""
    if not spec.probes:
        return []
    from ..probes import ProbeSettings

    fingerprint = ProbeSettings.from_dict(spec.probe_options).fingerprint()
    out = []
    for cell in spec.cells():
        path = store.final_dir(cell) / TIDY_ROW_FILE
        if path.is_file():
            try:
                row = json.loads(path.read_text())
                have = set(str(row.get(Col.PROBES) or "").split(","))
            except (OSError, ValueError, AttributeError):
                continue
            if not set(spec.probes) <= have or row.get(Col.PROBE_FINGERPRINT) != fingerprint:
                out.append(cell)
    return out


class _RunLog:
    """``<output_root>/runs/<start>-<host>-<pid>.json``, rewritten after every result, so even a killed run
    leaves an account of what it computed (``ended`` is null until the run returns or raises)."""

    def __init__(self, spec: MatrixSpec, executor: str):
        self.started = time.time()
        host, pid = socket.gethostname(), os.getpid()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        self.path = spec.output_root / RUNS_DIR / f"{stamp}-{host}-{pid}.json"
        self.head = {"matrix": spec.name, "host": host, "pid": pid, "executor": executor, "started": self.started}

    def write(self, summary: RunSummary, finished: bool = False) -> None:
        atomic_write_json(self.path, {**self.head, "ended": time.time() if finished else None,
                                      "seconds": round(time.time() - self.started, 3),
                                      "outcomes": summary.outcomes(), "counts": summary.counts,
                                      "cells": summary.cells, "failures": summary.failures})


def audit_runs(output_root: str | Path) -> dict[str, int]:
    """What the run logs under ``output_root`` (one folder of a spec) add up to: ``runs``; ``computed``, the cell
    computations that came back (status done or duplicate); ``distinct``, the cells among them; ``duplicated`` =
    computed - distinct, work done twice; ``failed``; ``stored``, the cells done now."""
    root = Path(output_root)
    ids: list[str] = []
    runs = failed = 0
    for path in sorted((root / RUNS_DIR).glob("*.json")):
        run = json.loads(path.read_text())
        runs += 1
        ids += run["cells"].get("done", []) + run["cells"].get("duplicate", [])
        failed += int(run["counts"].get("failed", 0))
    return {"runs": runs, "computed": len(ids), "distinct": len(set(ids)), "duplicated": len(ids) - len(set(ids)),
            "failed": failed, "stored": len(list((root / "cells").rglob(TIDY_ROW_FILE)))}


def matrix_status(spec: MatrixSpec) -> CellStatus:
    parts = [CellStore(p.output_root).status(p.cells()) for p in spec.parts()]
    return CellStatus(*([c for st in parts for c in getattr(st, k)] for k in ("done", "running", "failed", "pending")))


def render_status(spec: MatrixSpec, status: CellStatus, verbose: bool = False) -> str:
    c = status.counts()
    lines = [f"matrix {spec.name} at {spec.output_root}",
             f"done {c['done']}  running {c['running']}  failed {c['failed']}  pending {c['pending']}  (total {c['total']})"]
    for cell in status.failed:
        store = CellStore(spec.part(cell.variant).output_root)
        tb = (store.failure_dir(cell) / "traceback.txt").read_text().strip().splitlines()
        lines.append(f"FAILED {cell.describe()}: {tb[-1] if tb else '?'}  ({store.failure_dir(cell)})")
    if verbose:
        for cell in status.running:
            owner = CellStore(spec.part(cell.variant).output_root).claim_owner(cell)
            lines.append(f"running {cell.describe()}" + (f"  ({describe_claim(owner)})" if owner else ""))
        for cell in status.pending:
            lines.append(f"pending {cell.describe()}")
    return "\n".join(lines)
