"""``bbgic matrix run`` and ``status``: validate, generate missing records, run the cells that are not done."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..utils.io import atomic_write_text
from .executors import make_executor
from .jobs import cell_payload
from .spec import MatrixSpec, validate_spec
from .store import CellStatus, CellStore

log = logging.getLogger(__name__)


class MatrixSpecError(ValueError):
    """The spec cannot run; every problem found is listed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the matrix spec cannot run:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class RunSummary:
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, result: dict[str, Any]) -> None:
        status = result.get("status", "?")
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == "failed":
            self.failures.append(f"{result.get('cell_id') or result.get('record')}: {result.get('error')}")


def spec_dict(spec: MatrixSpec) -> dict[str, Any]:
    d = spec.to_dict()
    d["output_root"] = str(spec.output_root)
    d["bb_root"] = str(spec.bb_root)
    return d


def run_matrix(spec: MatrixSpec, executor_overrides: dict[str, Any] | None = None, validate: bool = True,
               max_cells: int | None = None) -> RunSummary:
    """Run every cell that is not done; failed cells are retried; done cells are skipped. A spec with named GIC
    variants runs each part (:meth:`~.spec.MatrixSpec.parts`) in its own folder."""
    if validate:
        problems = validate_spec(spec)
        if problems:
            raise MatrixSpecError(problems)
    summary = RunSummary()
    for part in spec.parts():
        max_cells = _run_part(part, executor_overrides, max_cells, summary)
    return summary


def _run_part(spec: MatrixSpec, executor_overrides: dict[str, Any] | None, max_cells: int | None,
              summary: RunSummary) -> int | None:
    """One folder's cells; returns how many of ``max_cells`` are left."""
    store = CellStore(spec.output_root)
    spec.output_root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec.output_root / "spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
    removed = store.clean_stale_staging()
    if removed:
        log.info("removed %d staging folders left by interrupted runs", removed)
    executor = make_executor(spec.executor, **(executor_overrides or {}))
    sd = spec_dict(spec)

    missing = [a for a in spec.attacks if a.generate is not None
               and not (spec.bb_root / "record" / a.record / "attack_result.pt").is_file()]
    if missing:
        log.info("generating %d missing attack record(s)", len(missing))
        executor.run([{"kind": "attack", "record": a.record, "generate": a.generate, "spec": sd} for a in missing],
                     summary.add, desc="attacks")
        still = [a.record for a in missing if not (spec.bb_root / "record" / a.record / "attack_result.pt").is_file()]
        if still:
            raise RuntimeError(f"could not generate record(s) {', '.join(still)}: " + "; ".join(summary.failures))

    todo = [c for c in spec.cells() if not store.is_done(c)]
    if max_cells is not None:
        todo = todo[:max_cells]
    log.info("%d of %d cells to run", len(todo), len(spec.cells()))
    executor.run([cell_payload(c, sd) for c in todo], summary.add, desc="cells")
    return None if max_cells is None else max_cells - len(todo)


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
            lines.append(f"running {cell.describe()}")
        for cell in status.pending:
            lines.append(f"pending {cell.describe()}")
    return "\n".join(lines)
