"""Where cells live on disk and what state each is in.

A cell is *done* exactly when ``<output_root>/<cell.relpath>/result.json`` exists. A cell runs in a private
staging folder (``.staging/<id>-<pid>-<nonce>``) and the finished folder is renamed into place in one atomic
step, so a run killed at any moment leaves either a complete cell or none, never a half-written one, and a
cell finished twice by racing runners is kept once. ``.locks/<id>.json`` marks a cell in flight (with host
and pid, so a lock left by a killed process is recognised as stale); ``failures/<id>/`` keeps the traceback
and log of the last failed attempt until the cell succeeds.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..results import TIDY_ROW_FILE
from ..utils.io import atomic_write_json, atomic_write_text
from .spec import Cell


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped, e.g. under a container init that does not
    reap orphans) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


@dataclass
class CellStatus:
    done: list[Cell]
    running: list[Cell]
    failed: list[Cell]
    pending: list[Cell]

    def counts(self) -> dict[str, int]:
        return {"done": len(self.done), "running": len(self.running), "failed": len(self.failed),
                "pending": len(self.pending), "total": len(self.done) + len(self.running) + len(self.failed)
                + len(self.pending)}


class CellStore:
    def __init__(self, output_root: str | os.PathLike):
        self.root = Path(output_root)

    # -- paths ------------------------------------------------------------------------------------------
    def final_dir(self, cell: Cell) -> Path:
        return self.root / cell.relpath

    def lock_path(self, cell: Cell) -> Path:
        return self.root / ".locks" / f"{cell.cell_id}.json"

    def failure_dir(self, cell: Cell) -> Path:
        return self.root / "failures" / cell.cell_id

    def new_staging_dir(self, cell: Cell) -> Path:
        d = self.root / ".staging" / f"{cell.cell_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    # -- state ------------------------------------------------------------------------------------------
    def is_done(self, cell: Cell) -> bool:
        return (self.final_dir(cell) / TIDY_ROW_FILE).is_file()

    def is_running(self, cell: Cell) -> bool:
        path = self.lock_path(cell)
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return False  # left behind by a killed process
        return True

    def is_failed(self, cell: Cell) -> bool:
        return (self.failure_dir(cell) / "traceback.txt").is_file()

    def status(self, cells: Iterable[Cell]) -> CellStatus:
        st = CellStatus([], [], [], [])
        for c in cells:
            if self.is_done(c):
                st.done.append(c)
            elif self.is_running(c):
                st.running.append(c)
            elif self.is_failed(c):
                st.failed.append(c)
            else:
                st.pending.append(c)
        return st

    # -- transitions --------------------------------------------------------------------------------------
    def acquire(self, cell: Cell) -> bool:
        """Take the cell's lock; False when another live process holds it."""
        path = self.lock_path(cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not self.is_running(cell):
            path.unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "cell": cell.describe()}, fh)
        return True

    def release(self, cell: Cell) -> None:
        self.lock_path(cell).unlink(missing_ok=True)

    def finalize(self, cell: Cell, staging: Path) -> bool:
        """Move a finished staging folder into place; False (and the staging folder dropped) if the cell was
        already done, so a cell is never stored twice."""
        final = self.final_dir(cell)
        if not (staging / TIDY_ROW_FILE).is_file():
            raise RuntimeError(f"staging folder {staging} has no {TIDY_ROW_FILE}: the cell did not finish")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if (final / TIDY_ROW_FILE).is_file():
                shutil.rmtree(staging, ignore_errors=True)
                return False
            shutil.rmtree(final)  # a leftover without result.json is not a result
        os.replace(staging, final)
        shutil.rmtree(self.failure_dir(cell), ignore_errors=True)
        return True

    def record_failure(self, cell: Cell, traceback_text: str, staging: Path | None = None) -> Path:
        d = self.failure_dir(cell)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "traceback.txt", traceback_text)
        atomic_write_json(d / "cell.json", {"cell": cell.describe(), "identity": cell.identity, "time": time.time()})
        if staging is not None and staging.is_dir():
            logs = sorted((staging / "log").glob("*.log")) if (staging / "log").is_dir() else []
            if logs:
                shutil.copy(logs[-1], d / "run.log")
            shutil.rmtree(staging, ignore_errors=True)
        return d

    def clean_stale_staging(self) -> int:
        """Remove staging folders left by processes that no longer run on this host."""
        root = self.root / ".staging"
        removed = 0
        if not root.is_dir():
            return 0
        for d in root.iterdir():
            parts = d.name.split("-")
            try:
                pid = int(parts[1])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid) or pid == os.getpid():
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed
