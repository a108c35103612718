"""What a worker does with one job: generate an attack record, or run one cell.

Jobs are plain picklable dicts so that the local process pool and Ray ship them the same way. A cell job runs
the pipeline into a staging folder; :func:`run_cell_local` then moves it into place, while
:func:`run_cell_packed` (used on Ray nodes that may not share the output filesystem) returns the folder's
files as bytes for the driver to materialise with :func:`unpack_into`. Either way the driver's
``CellStore.finalize`` is the single place a cell becomes done.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

from .spec import Cell
from .store import CellStore

_RECORD_CACHE: dict[tuple[str, str], Any] = {}


def cell_payload(cell: Cell, spec_dict: dict[str, Any]) -> dict[str, Any]:
    """A cell job; ``spec_dict`` is the :meth:`~.spec.MatrixSpec.to_dict` of the part that stores the cell."""
    return {"kind": "cell", "cell": cell.to_dict(), "spec": spec_dict}


def cell_from_payload(payload: dict[str, Any]) -> Cell:
    return Cell.from_dict(payload["cell"])


def _record(bb_root: str, name: str, trust: bool):
    """Records (and their datasets and PNGs) are loaded once per worker process."""
    from ..records import load_attack_record

    key = (bb_root, name)
    if key not in _RECORD_CACHE:
        _RECORD_CACHE[key] = load_attack_record(Path(bb_root) / "record" / name, bb_root, trust=trust)
    return _RECORD_CACHE[key]


def execute_cell(payload: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Run the cell's purification (:meth:`~.spec.Cell.request`), writing every file into ``output_dir``; returns
    the tidy row."""
    from ..pipeline import run_defense

    spec = payload["spec"]
    req = cell_from_payload(payload).request(spec, output_dir)
    return run_defense(req, record=_record(spec["bb_root"], req.result_file, req.trust_checkpoint))


def run_cell_local(payload: dict[str, Any]) -> dict[str, Any]:
    """Run a cell against the shared output root: staging folder, then atomic move into place."""
    cell = cell_from_payload(payload)
    store = CellStore(payload["spec"]["output_root"])
    if store.is_done(cell):
        return {"status": "skipped", "cell_id": cell.cell_id}
    if not store.acquire(cell):
        return {"status": "busy", "cell_id": cell.cell_id}
    staging = None
    try:
        staging = store.new_staging_dir(cell)
        row = execute_cell(payload, staging)
        stored = store.finalize(cell, staging)
        return {"status": "done" if stored else "duplicate", "cell_id": cell.cell_id, "row": row}
    except Exception:
        tb = traceback.format_exc()
        store.record_failure(cell, tb, staging)
        return {"status": "failed", "cell_id": cell.cell_id, "error": tb.strip().splitlines()[-1]}
    finally:
        store.release(cell)


def run_cell_packed(payload: dict[str, Any]) -> dict[str, Any]:
    """Run a cell in a private temporary folder and return its files as bytes (for remote workers)."""
    cell = cell_from_payload(payload)
    with tempfile.TemporaryDirectory(prefix="bbgic-cell-") as tmp:
        out = Path(tmp) / "cell"
        out.mkdir()
        try:
            row = execute_cell(payload, out)
        except Exception:
            return {"status": "failed", "cell_id": cell.cell_id, "traceback": traceback.format_exc()}
        files = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        dirs = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_dir()]
    return {"status": "ok", "cell_id": cell.cell_id, "row": row, "files": files, "dirs": dirs}


def unpack_into(result: dict[str, Any], staging: Path) -> None:
    for d in result.get("dirs", []):
        (staging / d).mkdir(parents=True, exist_ok=True)
    for rel, data in result["files"].items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def generate_record(payload: dict[str, Any]) -> dict[str, Any]:
    """Make a missing attack record from the spec's ``generate`` settings (resumable: skipped when present)."""
    from ..attacks import run_attack

    bb_root = Path(payload["spec"]["bb_root"])
    name = payload["record"]
    if (bb_root / "record" / name / "attack_result.pt").is_file():
        return {"status": "skipped", "record": name}
    settings = dict(payload["generate"])
    try:
        run_attack({**settings, "save_folder_name": name}, bb_root=bb_root, progress=False)
    except Exception:
        return {"status": "failed", "record": name, "error": traceback.format_exc()}
    return {"status": "done", "record": name}


def worker_env(slot: int, gpus: list[int]) -> dict[str, str]:
    """One worker per GPU: pin it with CUDA_VISIBLE_DEVICES; CPU workers split the cores."""
    env: dict[str, str] = {}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
    return env


def visible_gpus() -> list[int]:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return []
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # pragma: no cover
        return []
