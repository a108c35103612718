"""Executors: how jobs reach workers. ``local`` runs them in this process (one worker) or in a pool of
long-lived worker processes (one per visible GPU, or ``workers`` CPU processes); ``ray`` submits each job as
a Ray task with its ``num_cpus``/``num_gpus``, on a local Ray or an existing cluster. Both return the same
result dicts and both leave cells finalised by the same code, so the output root looks identical whichever
ran them.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from typing import Any, Callable

from ..utils.logs import progress_enabled
from ..utils.progress import progress_bar
from . import jobs as J
from .store import CellStore

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], None]


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

    def run(self, payloads: list[dict[str, Any]], on_result: Handler, desc: str = "jobs") -> None:
        if not payloads:
            return
        bar = progress_bar(total=len(payloads), desc=desc, disable=not progress_enabled(None))
        try:
            if self.workers == 1 and len(self.gpus) <= 1:
                for p in payloads:
                    on_result(_dispatch(p))
                    bar.update()
                return
            self._run_pool(payloads, on_result, bar)
        finally:
            bar.close()

    def _run_pool(self, payloads, on_result: Handler, bar) -> None:
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
                    bar.update()
                for s, w in list(slots.items()):
                    if not w["proc"].is_alive() and w["job"] is not None:
                        # the worker died holding a job: record it as failed, start a replacement
                        key, p = w["job"]
                        on_result(_worker_died(p, w["proc"].exitcode))
                        remaining -= 1
                        bar.update()
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


class RayExecutor:
    """Each job a Ray task. ``address`` joins an existing cluster ("auto" or host:port); without one a local
    Ray starts. Cell tasks return their files and the driver writes them, so workers need the records and data
    but not the output filesystem."""

    kind = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float | None = None,
                 max_retries: int = 1, local_num_cpus: int | None = None):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise RuntimeError("the ray executor needs Ray: pip install 'backdoorbench-gic[ray]' (or pip install ray)") from None
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.local_num_cpus = local_num_cpus

    def _init(self):
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.local_num_cpus, include_dashboard=False, log_to_driver=False)
        return ray

    def run(self, payloads: list[dict[str, Any]], on_result: Handler, desc: str = "jobs") -> None:
        if not payloads:
            return
        ray = self._init()
        num_gpus = self.num_gpus
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=num_gpus, max_retries=self.max_retries)(_ray_job)
        futures = {remote.remote(p): p for p in payloads}
        bar = progress_bar(total=len(payloads), desc=desc, disable=not progress_enabled(None))
        try:
            while futures:
                done, _ = ray.wait(list(futures), num_returns=1)
                ref = done[0]
                payload = futures.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task itself died (node lost, killed)
                    result = {"status": "failed", "traceback": f"Ray task failed: {exc}\n"}
                on_result(_materialise(payload, result))
                bar.update()
        finally:
            bar.close()

    @staticmethod
    def shutdown() -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


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
        return {"status": "failed", "cell_id": cell.cell_id, "error": result.get("traceback", "").strip().splitlines()[-1:]}
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
        allowed = {"address", "num_cpus", "num_gpus", "max_retries", "local_num_cpus"}
        bad = set(cfg) - allowed
        if bad:
            raise ValueError(f"unknown ray executor option(s) {sorted(bad)}; known: {sorted(allowed)}")
        return RayExecutor(**cfg)
    raise ValueError(f"unknown executor {kind!r}: use local or ray")
