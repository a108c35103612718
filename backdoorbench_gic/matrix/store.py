"""Where cells live on disk and what state each is in.

A cell is *done* exactly when ``<output_root>/<cell.relpath>/result.json`` exists. A cell runs in a private
staging folder (``.staging/<id>-<pid>-<nonce>``) and the finished folder is renamed into place in one atomic
step, so a run killed at any moment leaves either a complete cell or none, never a half-written one, and a
cell finished twice by racing runners is kept once. ``failures/<id>/`` keeps the traceback and log of the
last failed attempt until the cell succeeds.

``.locks/<id>.json`` is a cell's *claim*: the process that computes it (a local worker) or that sent it to a
Ray cluster (the driver) holds it while the cell is in flight, so ``status`` counts the cell as running and a
concurrent run of the same spec skips it. A claim expires with its owner: on the owner's host when its pid is
gone; elsewhere (an output root shared between hosts) when the owner has not refreshed it for
:data:`CLAIM_TTL` seconds (a daemon thread of the owning process touches its claims every
:data:`HEARTBEAT` seconds).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..results import TIDY_ROW_FILE
from ..utils.io import atomic_write_json, atomic_write_text
from .spec import Cell

HEARTBEAT = 30.0  # seconds between refreshes of the claims a process holds
CLAIM_TTL = 300.0  # a claim from another host not refreshed for this long is stale (its owner is gone)

_held: set[Path] = set()  # the claims this process holds, refreshed by the heartbeat thread
_held_lock = threading.Lock()
_heartbeat: list[threading.Thread] = []


def _refresh_claims() -> None:
    while True:
        time.sleep(HEARTBEAT)
        with _held_lock:
            paths = list(_held)
        for path in paths:
            try:
                os.utime(path)
            except OSError:  # released meanwhile
                pass


def _hold(path: Path) -> None:
    with _held_lock:
        _held.add(path)
        if not _heartbeat or not _heartbeat[0].is_alive():
            _heartbeat[:] = [threading.Thread(target=_refresh_claims, name="bbgic-claims", daemon=True)]
            _heartbeat[0].start()


def _drop(path: Path) -> None:
    with _held_lock:
        _held.discard(path)


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


def describe_claim(info: dict) -> str:
    """``pid 4242 on node-3 (ray, 0:02:10)``: who holds a claim, how it computes the cell, for how long."""
    from ..utils.progress import format_seconds

    age = format_seconds(time.time() - float(info.get("started", time.time())))
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('how', 'local')}, {age})"


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

    def claim_owner(self, cell: Cell) -> dict | None:
        """The live claim on ``cell`` (host, pid, started, ...), or None when there is none or its owner is gone."""
        path = self.lock_path(cell)
        try:
            info = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            return None
        if info.get("host") == socket.gethostname():
            if not _pid_alive(int(info.get("pid", -1))):
                return None  # left behind by a killed process
        elif age > CLAIM_TTL:
            return None  # another host's owner stopped refreshing it
        return info

    def is_running(self, cell: Cell) -> bool:
        return self.claim_owner(cell) is not None

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
    def acquire(self, cell: Cell, how: str = "local") -> bool:
        """Claim the cell for this process; False when another live process holds it. ``how`` says how it is
        computed (``local``, ``ray``) for ``status``."""
        path = self.lock_path(cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not self.is_running(cell):
            path.unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "how": how,
                       "cell": cell.describe()}, fh)
        _hold(path)
        return True

    def claim(self, cell: Cell, how: str = "local") -> str:
        """``claimed`` (this process now owns the cell), ``done`` (already stored: nothing to do) or ``busy``
        (another live run owns it). The done check follows the claim, so a cell another run finished between a
        caller's listing and this claim is not computed again."""
        if self.is_done(cell):
            return "done"
        if not self.acquire(cell, how):
            return "busy"
        if self.is_done(cell):
            self.release(cell)
            return "done"
        return "claimed"

    def release(self, cell: Cell) -> None:
        path = self.lock_path(cell)
        _drop(path)
        path.unlink(missing_ok=True)

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
