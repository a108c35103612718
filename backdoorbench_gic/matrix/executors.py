"""Executors: how jobs reach workers. ``local`` runs them in this process (one worker) or in a pool of
long-lived worker processes (one per visible GPU, or ``workers`` CPU processes); ``ray`` submits each job as
a Ray task with its ``num_cpus``/``num_gpus``, on a local Ray or an existing cluster. Both return the same
result dicts and both leave cells finalised by the same code, so the output root looks identical whichever
ran them.

Either way a cell is claimed (:meth:`CellStore.claim`) before it is computed: by the local worker that runs it,
or by the Ray driver when it submits it (the driver keeps at most one cluster's worth of cells in flight, so
its claims are the cells that run). A concurrent run of the same spec skips claimed cells, and ``status``
counts them as running. Results are tallied as done, failed or skipped (:class:`RunSummary`).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..utils.logs import progress_enabled
from ..utils.progress import format_seconds, progress_bar
from . import jobs as J
from .store import CellStore, describe_claim

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], None]

# a job's status -> what the tallies call it. skipped: nothing computed (already done: "skipped"; claimed by
# another run: "busy") or computed in vain (another run stored the cell first: "duplicate")
OUTCOMES = {"done": "done", "failed": "failed", "skipped": "skipped", "busy": "skipped", "duplicate": "skipped"}
_SKIP_REASONS = (("skipped", "already done"), ("busy", "claimed by another run"),
                 ("duplicate", "computed, but another run stored them first"))


@dataclass
class RunSummary:
    """A run's jobs by status, with the ids of the cells in each, and the failures' last lines."""

    counts: dict[str, int] = field(default_factory=dict)
    cells: dict[str, list[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    owners: set[str] = field(default_factory=set)  # who held the cells this run skipped as claimed

    def add(self, result: dict[str, Any]) -> None:
        status = result.get("status", "?")
        self.counts[status] = self.counts.get(status, 0) + 1
        if result.get("cell_id"):
            self.cells.setdefault(status, []).append(result["cell_id"])
        if result.get("owner"):
            self.owners.add(result["owner"])
        if status == "failed":
            self.failures.append(f"{result.get('cell_id') or result.get('record')}: {result.get('error')}")

    def outcomes(self) -> dict[str, int]:
        out = {"done": 0, "failed": 0, "skipped": 0}
        for status, n in self.counts.items():
            out[OUTCOMES.get(status, "failed")] += n
        return out

    def line(self) -> str:
        """``7 done, 1 failed, 2 skipped (2 claimed by another run)``."""
        o = self.outcomes()
        why = [f"{self.counts[k]} {text}" for k, text in _SKIP_REASONS if self.counts.get(k)]
        return (f"{o['done']} done, {o['failed']} failed, {o['skipped']} skipped"
                + (f" ({'; '.join(why)})" if why else ""))


class _Progress:
    """The progress bar of one stage, counting done, failed and skipped apart, and its final line."""

    def __init__(self, total: int, desc: str):
        self.desc, self.total, self.start = desc, total, time.monotonic()
        self.summary = RunSummary()
        self.bar = progress_bar(total=total, desc=desc, leave=False, disable=not progress_enabled(None))

    def add(self, result: dict[str, Any]) -> None:
        self.summary.add(result)
        self.bar.set_postfix_str(self.summary.line())
        self.bar.update()

    def close(self) -> None:
        self.bar.write(f"{self.desc}: {self.summary.line()} of {self.total} in "
                       f"{format_seconds(time.monotonic() - self.start)}")
        self.bar.close()


def _dispatch(payload: dict[str, Any]) -> dict[str, Any]:
    if payload["kind"] == "cell":
        return J.run_cell_local(payload)
    if payload["kind"] == "attack":
        return J.generate_record(payload)
    raise ValueError(f"unknown job kind {payload['kind']!r}")


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this worker when the driver dies, so a killed run leaves no orphan that
    keeps pulling queued cells (and races the next run for them). Elsewhere the ppid check below does it."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _worker_main(task_q, result_q, env: dict[str, str], threads: int | None, parent: int | None = None) -> None:
    _die_with_parent()
    if parent is not None and os.getppid() != parent:  # the driver died before the signal was armed
        return
    os.environ.update(env)
    import torch

    if threads:
        torch.set_num_threads(threads)
    while True:
        item = task_q.get()
        if item is None or (parent is not None and os.getppid() != parent):
            return
        key, payload = item
        try:
            result = _dispatch(payload)
        except BaseException as exc:  # the job functions catch their own errors; this is a last resort
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        result_q.put((key, result))


class LocalExecutor:
    """``workers`` = 1 runs jobs in this process; more starts that many worker processes (spawned, so CUDA is
    safe), each pinned to one GPU when GPUs are visible. A worker that dies mid-job (killed, out of memory)
    costs only its job, which is recorded as failed; a replacement worker takes over."""

    kind = "local"

    def __init__(self, workers: int | None = None, threads_per_worker: int | None = None):
        self.gpus = J.visible_gpus()
        self.workers = int(workers) if workers else max(1, len(self.gpus))
        # CPU workers share the cores: torch's OpenMP threads spin while they wait, so oversubscribing the
        # cores (every worker using all of them) is many times slower, not a little
        self.threads = threads_per_worker or (None if self.gpus else max(1, (os.cpu_count() or 1) // self.workers))

    def connect(self) -> None:
        """Nothing to reach: workers start with the first job."""

    def run(self, payloads: list[dict[str, Any]], on_result: Handler, desc: str = "jobs") -> None:
        if not payloads:
            return
        progress = _Progress(len(payloads), desc)

        def handle(result: dict[str, Any]) -> None:
            on_result(result)
            progress.add(result)

        try:
            if self.workers == 1 and len(self.gpus) <= 1:
                for p in payloads:
                    handle(_dispatch(p))
                return
            self._run_pool(payloads, handle)
        finally:
            progress.close()

    def _run_pool(self, payloads, on_result: Handler) -> None:
        ctx = mp.get_context("spawn")
        result_q = ctx.Queue()
        todo = list(enumerate(payloads))
        slots: dict[int, dict[str, Any]] = {}

        def start(slot: int) -> None:
            task_q = ctx.Queue()
            proc = ctx.Process(target=_worker_main,
                               args=(task_q, result_q, J.worker_env(slot, self.gpus), self.threads, os.getpid()),
                               daemon=True)
            proc.start()
            slots[slot] = {"proc": proc, "tasks": task_q, "job": None}

        for s in range(self.workers):
            start(s)
        remaining = len(payloads)
        try:
            while remaining:
                for s, w in slots.items():
                    if w["job"] is None and todo:
                        key, p = todo.pop(0)
                        w["job"] = (key, p)
                        w["tasks"].put((key, p))
                try:
                    key, result = result_q.get(timeout=0.5)
                except queue.Empty:
                    key = None
                if key is not None:
                    for w in slots.values():
                        if w["job"] is not None and w["job"][0] == key:
                            w["job"] = None
                    on_result(result)
                    remaining -= 1
                for s, w in list(slots.items()):
                    if not w["proc"].is_alive() and w["job"] is not None:
                        # the worker died holding a job: record it as failed, start a replacement
                        key, p = w["job"]
                        on_result(_worker_died(p, w["proc"].exitcode))
                        remaining -= 1
                        start(s)
        finally:
            for w in slots.values():
                try:
                    w["tasks"].put(None)
                except Exception:
                    pass
            deadline = time.time() + 10
            for w in slots.values():
                w["proc"].join(max(0.0, deadline - time.time()))
                if w["proc"].is_alive():
                    w["proc"].terminate()


def _worker_died(payload: dict[str, Any], exitcode: int | None) -> dict[str, Any]:
    msg = f"worker process died with exit code {exitcode} while running this job"
    if payload["kind"] == "cell":
        cell = J.cell_from_payload(payload)
        store = CellStore(payload["spec"]["output_root"])
        store.release(cell)
        store.record_failure(cell, msg + "\n")
        return {"status": "failed", "cell_id": cell.cell_id, "error": msg}
    return {"status": "failed", "record": payload.get("record"), "error": msg}


class ClusterUnreachable(RuntimeError):
    """The Ray cluster named by an address cannot be reached in time; the message says what to check."""


def resolve_ray_address(address: str) -> str:
    """``address`` as Ray will dial it: ``auto`` read from RAY_ADDRESS or the last ``ray start``, and a loopback
    host rewritten to this node's outward IP (unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # pragma: no cover - Ray moved it: dial what we were given
        return address
    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:  # "auto" with no cluster running, a malformed address
        raise ClusterUnreachable(f"cannot find the Ray cluster {address!r}: {str(exc).splitlines()[0]} Check the "
                                 "address (`ray status` on the head node prints it), or leave --ray_address out to "
                                 "start a local Ray") from None
    return resolved or address


def connect_ray(address: str, timeout: float):
    """Join the cluster at ``address`` within ``timeout`` seconds, or raise :class:`ClusterUnreachable` naming the
    address as given and as Ray resolved it (Ray itself retries an unreachable address for many minutes)."""
    import ray

    resolved = resolve_ray_address(address)
    as_resolved = "" if resolved == address else f" (Ray resolved it to {resolved})"
    host, _, port = resolved.rpartition(":")
    loopback = address.split(":")[0] in ("127.0.0.1", "localhost", "::1") and resolved != address

    def fail(why: str) -> ClusterUnreachable:
        hint = ("; a cluster started on the loopback address needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in this "
                "run's environment, so that Ray keeps 127.0.0.1" if loopback else "")
        return ClusterUnreachable(f"cannot connect to the Ray cluster at {address}{as_resolved}: {why}. Check the "
                                  f"address (`ray status` on the head node prints it){hint}; --ray_timeout waits "
                                  "longer")

    t0 = time.monotonic()
    try:  # nothing listening: say so at once instead of letting Ray retry
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise fail(f"nothing answers there ({exc.strerror or exc})" if isinstance(exc, OSError) else str(exc)) from None
    outcome: dict[str, Any] = {}

    def init() -> None:
        try:
            ray.init(address=resolved, log_to_driver=False)
            outcome["ok"] = True
        except BaseException as exc:  # reported by the caller's thread
            outcome["error"] = exc

    # Ray waits for a cluster that does not answer its handshake for many minutes; a daemon thread lets the
    # wait be bounded (on timeout the thread is abandoned, and the process can still exit)
    worker_log = logging.getLogger("ray._private.worker")
    quiet = _DropMainThreadWarning()
    worker_log.addFilter(quiet)
    thread = threading.Thread(target=init, name="bbgic-ray-connect", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout - (time.monotonic() - t0)))
    worker_log.removeFilter(quiet)
    if "error" in outcome:
        exc = outcome["error"]
        raise fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not outcome.get("ok"):
        raise fail(f"no answer to Ray's handshake within {timeout:g} s (is it a Ray head's GCS port?)")
    return ray


class _DropMainThreadWarning(logging.Filter):
    """Ray warns that it sets no SIGTERM handler outside the main thread; connecting in a thread is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not the main thread" not in record.getMessage()


class RayExecutor:
    """Each job a Ray task. ``address`` joins an existing cluster ("auto" or host:port) within
    ``connect_timeout`` seconds; without one a local Ray starts. The driver claims each cell as it submits it
    and keeps at most as many cells in flight as the cluster has slots (its CPUs over ``num_cpus``, and its GPUs
    over ``num_gpus``), recounted as nodes join and leave. Cell tasks return their files and the driver writes
    them, so workers need the records and data but not the output filesystem."""

    kind = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float | None = None,
                 max_retries: int = 1, local_num_cpus: int | None = None, connect_timeout: float = 30.0):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise RuntimeError("the ray executor needs Ray: pip install 'backdoorbench-gic[ray]' (or pip install ray)") from None
        if not float(connect_timeout) > 0:
            raise ValueError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
        if not float(num_cpus) > 0:
            raise ValueError(f"num_cpus must be > 0 (Ray's CPUs per task), got {num_cpus!r}")
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.local_num_cpus = local_num_cpus
        self.connect_timeout = float(connect_timeout)

    def connect(self):
        """Join the cluster (or start the local Ray) now; :class:`ClusterUnreachable` when it cannot be reached."""
        import ray

        if not ray.is_initialized():
            if self.address:
                connect_ray(self.address, self.connect_timeout)
            else:
                # "local" always starts a fresh Ray: without it, Ray would join whatever cluster RAY_ADDRESS or
                # its last-cluster file names on this host, and then refuse num_cpus
                ray.init(address="local", num_cpus=self.local_num_cpus, include_dashboard=False,
                         log_to_driver=False)
        return ray

    def _slots(self, ray, num_gpus: float) -> int:
        """Cells the cluster runs at once now (at least one, so a run never stalls while nodes come back)."""
        res = ray.cluster_resources()
        n = res.get("CPU", 0.0) / self.num_cpus
        if num_gpus:
            n = min(n, res.get("GPU", 0.0) / num_gpus)
        return max(1, int(n + 1e-9))

    def run(self, payloads: list[dict[str, Any]], on_result: Handler, desc: str = "jobs") -> None:
        if not payloads:
            return
        ray = self.connect()
        num_gpus = self.num_gpus
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=num_gpus, max_retries=self.max_retries)(_ray_job)
        todo = list(payloads)
        futures: dict[Any, dict[str, Any]] = {}
        progress = _Progress(len(payloads), desc)

        def handle(result: dict[str, Any]) -> None:
            on_result(result)
            progress.add(result)

        try:
            while todo or futures:
                slots = self._slots(ray, num_gpus)
                while todo and len(futures) < slots:
                    payload = todo.pop(0)
                    refused = _claim(payload)
                    if refused is not None:
                        handle(refused)
                        continue
                    futures[remote.remote(payload)] = payload
                if not futures:
                    continue
                done, _ = ray.wait(list(futures), num_returns=1, timeout=1.0)
                for ref in done:
                    payload = futures.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # the task itself died (node lost, killed)
                        result = {"status": "failed", "traceback": f"Ray task failed: {exc}\n"}
                    try:
                        result = _materialise(payload, result)
                    finally:
                        _release(payload)
                    handle(result)
        finally:
            for ref, payload in futures.items():  # interrupted: give the claims back, stop the tasks
                _release(payload)
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or its node is gone
                    pass
            progress.close()

    @staticmethod
    def shutdown() -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _claim(payload: dict[str, Any]) -> dict[str, Any] | None:
    """Claim a cell for this driver; None when claimed (or not a cell), else the result that says why not."""
    if payload["kind"] != "cell":
        return None
    cell = J.cell_from_payload(payload)
    store = CellStore(payload["spec"]["output_root"])
    state = store.claim(cell, how="ray")
    if state == "claimed":
        return None
    if state == "done":
        return {"status": "skipped", "cell_id": cell.cell_id}
    owner = store.claim_owner(cell)
    return {"status": "busy", "cell_id": cell.cell_id, "owner": describe_claim(owner) if owner else "another run"}


def _release(payload: dict[str, Any]) -> None:
    if payload["kind"] == "cell":
        CellStore(payload["spec"]["output_root"]).release(J.cell_from_payload(payload))


def _ray_job(payload: dict[str, Any]) -> dict[str, Any]:
    if payload["kind"] == "cell":
        return J.run_cell_packed(payload)
    return J.generate_record(payload)


def _materialise(payload: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Driver side of a Ray cell: write the returned files into staging and finalise, or record the failure."""
    if payload["kind"] != "cell":
        return result
    cell = J.cell_from_payload(payload)
    store = CellStore(payload["spec"]["output_root"])
    if result.get("status") != "ok":
        store.record_failure(cell, result.get("traceback", result.get("error", "unknown error")))
        last = (result.get("traceback") or result.get("error") or "unknown error").strip().splitlines()
        return {"status": "failed", "cell_id": cell.cell_id, "error": last[-1] if last else "unknown error"}
    if store.is_done(cell):
        return {"status": "duplicate", "cell_id": cell.cell_id, "row": result["row"]}
    staging = store.new_staging_dir(cell)
    J.unpack_into(result, staging)
    stored = store.finalize(cell, staging)
    return {"status": "done" if stored else "duplicate", "cell_id": cell.cell_id, "row": result["row"]}


def make_executor(config: dict[str, Any] | None = None, **overrides: Any):
    cfg = {**(config or {}), **{k: v for k, v in overrides.items() if v is not None}}
    kind = cfg.pop("kind", "local")
    if kind == "local":
        allowed = {"workers", "threads_per_worker"}
        bad = set(cfg) - allowed
        if bad:
            raise ValueError(f"unknown local executor option(s) {sorted(bad)}; known: {sorted(allowed)}")
        return LocalExecutor(**cfg)
    if kind == "ray":
        allowed = {"address", "num_cpus", "num_gpus", "max_retries", "local_num_cpus", "connect_timeout"}
        bad = set(cfg) - allowed
        if bad:
            raise ValueError(f"unknown ray executor option(s) {sorted(bad)}; known: {sorted(allowed)}")
        return RayExecutor(**cfg)
    raise ValueError(f"unknown executor {kind!r}: use local or ray")
