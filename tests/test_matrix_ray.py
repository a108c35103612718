"""The matrix on Ray and between concurrent runs: cells claimed once (a claim dies with its owner), honest
done/failed/skipped counts, validation that reaches each cell's single-run check, an unreachable cluster refused
with one line, and a two-node cluster (Ray's own ``ray.cluster_utils.Cluster``) that loses a worker mid-run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from backdoorbench_gic.cli import main as bbgic
from backdoorbench_gic.matrix import audit_runs, load_spec, matrix_status, render_status, run_matrix, validate_matrix
from backdoorbench_gic.matrix.executors import RunSummary, _Progress
from backdoorbench_gic.matrix.store import CLAIM_TTL, CellStore


def tiny_spec(tmp_path: Path, bb_root: Path, name: str = "s", **changes) -> Path:
    """Cells of the session record (untrained width-8 PreActResNet-18) that take about a second each."""
    spec = {"name": name, "output_root": str(tmp_path / f"{name}-out"), "bb_root": str(bb_root),
            "attacks": ["badnet_fixture"], "defenses": [{"name": "ft", "overrides": {"epochs": 2, "batch_size": 10}}],
            "aux": ["train"], "aux_sizes": [{"ratio": 0.2}], "seeds": [0, 1, 2, 3], "eval_limit": 20,
            "defaults": {"device": "cpu"}, "executor": {"kind": "local", "workers": 1}, **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# -- claims ----------------------------------------------------------------------------------------------------
def test_a_claim_lives_as_long_as_its_owner(bb_record, tmp_path):
    spec = load_spec(tiny_spec(tmp_path, bb_record[0], seeds=[0]))
    cell = spec.cells()[0]
    store = CellStore(spec.output_root)
    assert store.claim(cell) == "claimed" and store.claim_owner(cell)["pid"] == os.getpid()
    assert store.claim(cell) == "busy"  # held, even by this very process
    store.release(cell)
    lock = store.lock_path(cell)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": 0}))
    assert not store.is_running(cell) and store.claim(cell) == "claimed"  # its owner died: runnable again
    store.release(cell)
    # another host's owner is known alive only by its heartbeat (the file's mtime)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    assert store.is_running(cell) and store.claim(cell) == "busy"
    old = time.time() - CLAIM_TTL - 5
    os.utime(lock, (old, old))
    assert not store.is_running(cell) and store.claim(cell) == "claimed"
    store.release(cell)
    assert not lock.exists()


def test_progress_counts_done_failed_and_skipped_apart(monkeypatch, capsys):
    monkeypatch.delenv("BBGIC_NO_PROGRESS", raising=False)
    monkeypatch.setenv("BBGIC_PROGRESS", "lines")
    progress = _Progress(5, "cells")
    for status in ("done", "done", "failed", "busy", "duplicate"):
        progress.add({"status": status, "cell_id": status})
    progress.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cells: 2 done, 1 failed, 2 skipped (1 claimed by another run; 1 computed, but "
                              "another run stored them first) of 5 in ")
    assert not any("done 5/5" in line for line in err)  # the old bar's "done N/N" whatever happened
    summary = RunSummary()
    summary.add({"status": "skipped", "cell_id": "a"})
    assert summary.line() == "0 done, 0 failed, 1 skipped (1 already done)"


# -- validation --------------------------------------------------------------------------------------------------
def test_validate_runs_each_cells_single_run_check(bb_record, tmp_path, capsys):
    """The record was trained on plain CIFAR-10 (no held-out split): 'reserved' cells would fail at run time, so
    the spec is INVALID; an option the auxiliary source does not take, given per type, is caught too."""
    bad = tiny_spec(tmp_path, bb_record[0], "bad", seeds=[0, 1], aux=["train", "reserved", "mix:train+reserved"],
                    aux_options_for={"train": {"include_poisoned_indices": False, "shift_seed": 3}})
    assert bbgic(["matrix", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.strip().endswith("INVALID")
    assert "'reserved' needs a held-out split" in out and "bbgic split" in out
    assert "mix:train+reserved" in out
    assert "2 cell(s), e.g. badnet_fixture | ft-" in out and "'shift_seed'" in out  # per cell, both seeds
    good = load_spec(tiny_spec(tmp_path, bb_record[0], "good", seeds=[0], aux=["train"],
                               aux_options_for={"train": {"include_poisoned_indices": False}}))
    assert validate_matrix(good) == []
    assert run_matrix(good).counts == {"done": 1}  # VALID runs


# -- connecting to a cluster ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_is_one_line_and_exit_2(bb_record, tmp_path, capsys):
    pytest.importorskip("ray")
    spec = tiny_spec(tmp_path, bb_record[0], seeds=[0])
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    assert bbgic(["matrix", "run", str(spec), "--ray_address", address, "--ray_timeout", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith(f"bbgic matrix: error: cannot connect to the Ray cluster at {address}")
    assert "nothing answers there" in err[-1] and "Check the address" in err[-1]
    if "Ray resolved it to" in err[-1]:  # Ray rewrote the loopback address: the setting that keeps it is named
        assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in err[-1]
    assert not (tmp_path / "s-out").exists()  # refused before anything was written


def test_a_silent_port_is_given_up_after_the_timeout(bb_record, tmp_path):
    """Something listens but never answers Ray's handshake (Ray alone would retry for many minutes)."""
    pytest.importorskip("ray")
    spec = tiny_spec(tmp_path, bb_record[0], seeds=[0])
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen(8)
        address = f"{socket.gethostbyname(socket.gethostname())}:{listener.getsockname()[1]}"
        proc = subprocess.run([sys.executable, "-m", "backdoorbench_gic.cli", "matrix", "run", str(spec),
                               "--ray_address", address, "--ray_timeout", "2"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("bbgic matrix: error:")]
    assert line and "no answer to Ray's handshake within 2 s" in line[0] and address in line[0]


# -- a real (local, two-node) cluster ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, one CPU each, dashboard off; torch in its workers on one thread. Shut down (with
    every Ray process) whatever the tests do. (Every driver starts a worker process per node, which imports torch:
    two nodes keep that cost down.)"""
    ray_utils = pytest.importorskip("ray.cluster_utils")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    c = ray_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.workers = [c.add_node(num_cpus=1)]
        yield c
    finally:
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _driver(spec: Path, cluster) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "backdoorbench_gic.cli", "matrix", "run", str(spec), "--ray_address",
           cluster.address, "--ray_timeout", "60"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "BBGIC_NO_PROGRESS": "1"}, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    return out


def test_two_concurrent_runs_on_ray_compute_each_cell_once(bb_record, cluster, tmp_path):
    spec_path = tiny_spec(tmp_path, bb_record[0])
    spec = load_spec(spec_path)
    held = spec.cells()[0]
    store = CellStore(spec.output_root)
    assert store.claim(held) == "claimed"  # a third, live run holds one cell throughout
    try:
        first, second = _driver(spec_path, cluster), _driver(spec_path, cluster)
        outs = [_finish(first), _finish(second)]
        for out in outs:  # each says that it left the held cell (and any the other run held) alone
            assert "claimed by another run" in out and f"pid {os.getpid()}" in out
        audit = audit_runs(spec.output_root)
        assert audit == {"runs": 2, "computed": 3, "distinct": 3, "duplicated": 0, "failed": 0, "stored": 3}
        status = matrix_status(spec)
        assert status.counts()["running"] == 1 and status.running == [held]  # a claim is "running"
        assert f"pid {os.getpid()}" in render_status(spec, status, verbose=True)
    finally:
        store.release(held)
    assert matrix_status(spec).counts()["pending"] == 1


def test_a_worker_node_lost_mid_run_loses_no_cell(bb_record, cluster, tmp_path):
    spec_path = tiny_spec(tmp_path, bb_record[0], executor={"kind": "ray", "max_retries": 1},
                          defenses=[{"name": "ft", "overrides": {"epochs": 6, "batch_size": 4}}])
    spec = load_spec(spec_path)
    proc = _driver(spec_path, cluster)
    try:
        t0 = time.time()  # both nodes busy (the driver claims one cell per CPU) and the first cell stored
        while not (matrix_status(spec).counts()["running"] == 2 and any(spec.output_root.glob("cells/**/result.json"))):
            assert proc.poll() is None and time.time() - t0 < 240, "the run ended or stalled before the fault"
            time.sleep(0.2)
        claims = [json.loads(p.read_text()) for p in (spec.output_root / ".locks").glob("*.json")]
        assert {c["how"] for c in claims} == {"ray"} and {c["pid"] for c in claims} == {proc.pid}
        cluster.remove_node(cluster.workers.pop())
        out = _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "this run: 4 done, 0 failed, 0 skipped" in out
    assert audit_runs(spec.output_root) == {"runs": 1, "computed": 4, "distinct": 4, "duplicated": 0, "failed": 0,
                                            "stored": 4}
    assert matrix_status(spec).counts() == {"done": 4, "running": 0, "failed": 0, "pending": 0, "total": 4}
    assert not list((spec.output_root / ".staging").iterdir())
