"""The matrix runner on a Ray cluster under faults: what happens to the cells when a node, the driver or the
address goes wrong, and whether any cell is lost or computed twice.

A three-node Ray cluster on this machine (Ray's own ``ray.cluster_utils.Cluster``: a head and two workers, one CPU
each, dashboard off, torch on one thread) runs one spec of 8 small cells (FT and FST, 4 seeds, on a generated
fixture record: ``backdoorbench_gic.testing.make_bb_record``, a SmallCNN trained for 60 steps) with the command a
user types, ``bbgic matrix run SPEC --ray_address ADDR``, once per scenario from an empty output root:

- no fault;
- a worker node removed while every node runs a cell (the spec's ``max_retries`` 1, then 0; after 0, a rerun);
- the driver SIGKILLed mid-run (with its process group), then a rerun;
- two runs of the spec started together;
- an address where nothing listens, and one that accepts connections but is not Ray (``--ray_timeout 10``);
- ``aux: [train, reserved]`` on a record trained on a dataset without a held-out split (``bbgic matrix validate``,
  then ``run``).

The counts come from the runs' own logs (``<output_root>/runs/*.json``, read by
:func:`backdoorbench_gic.matrix.audit_runs`): done = cells stored, failed = failed computations, duplicated =
computations of a cell beyond its first. Wall = seconds of the scenario's ``bbgic`` commands (a rerun included),
cluster start-up excluded. The cells are tiny on purpose: what is measured is the behaviour, not throughput
(``benchmarks/matrix_scaling.py`` measures that). Writes ``<results>/matrix_faults.{md,json}``.

    python benchmarks/matrix_faults.py                  # about 5 minutes on 2 cores
    python benchmarks/matrix_faults.py --report_only    # the table again from results/matrix_faults.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from backdoorbench_gic.analysis import command_line, machine_info
from backdoorbench_gic.matrix import audit_runs, load_spec, matrix_status
from backdoorbench_gic.testing import make_bb_record
from backdoorbench_gic.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BBGIC_PROGRESS": "lines"}


class Bench:
    def __init__(self, work: Path, cluster, wait_s: float):
        self.work, self.cluster, self.wait_s = work, cluster, wait_s
        self.workers = [cluster.add_node(num_cpus=1) for _ in range(2)]

    def spec(self, name: str, **changes: Any) -> Path:
        spec = {"name": name, "output_root": str(self.work / name), "bb_root": str(self.work / "bb"),
                "attacks": ["victim"], "aux": ["train"], "aux_sizes": [{"ratio": 0.2}], "seeds": [0, 1, 2, 3],
                "defenses": [{"name": d, "overrides": {"epochs": 8, "batch_size": 10}} for d in ("ft", "fst")],
                "defaults": {"device": "cpu"}, "eval_limit": 60, "executor": {"kind": "ray", "max_retries": 1},
                **changes}
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    def start(self, args: list[Any], log: str, address: str | None = None) -> subprocess.Popen:
        address = address or self.cluster.address
        cmd = [sys.executable, "-m", "backdoorbench_gic.cli", "matrix", *map(str, args)]
        if args[0] == "run":
            cmd += ["--ray_address", address]
        fh = open(self.work / f"{log}.log", "w")
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **ENV},
                                start_new_session=True)

    def finish(self, proc: subprocess.Popen, log: str) -> tuple[int, str]:
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode, (self.work / f"{log}.log").read_text()

    def run(self, args: list[Any], log: str, address: str | None = None) -> tuple[int, str, float]:
        t = time.perf_counter()
        rc, out = self.finish(self.start(args, log, address), log)
        return rc, out, time.perf_counter() - t

    def until(self, what: str, proc: subprocess.Popen, ready) -> None:
        t0 = time.time()
        while not ready():
            if proc.poll() is not None or time.time() - t0 > self.wait_s:
                raise RuntimeError(f"the run ended or stalled before {what}")
            time.sleep(0.2)


def last_line(text: str, prefix: str) -> str:
    """The output's last line that starts with ``prefix``, with this machine's addresses and ports masked."""
    lines = [x.strip() for x in text.splitlines() if x.strip().startswith(prefix)]
    return re.sub(r"\b(\d{1,3}(?:\.\d{1,3}){3}):\d+", lambda m: ("127.0.0.1" if m.group(1) == "127.0.0.1" else
                  "NODE_IP") + ":PORT", lines[-1]) if lines else "-"


def counts(spec_path: Path) -> dict[str, int]:
    return audit_runs(load_spec(spec_path).output_root)


def all_busy(spec_path: Path):
    """Every node runs a cell (the driver holds one claim per CPU) and one cell is stored already."""
    spec = load_spec(spec_path)
    return lambda: (matrix_status(spec).counts()["running"] == 3
                    and any(spec.output_root.glob("cells/**/result.json")))


def no_fault(b: Bench) -> dict[str, Any]:
    s = b.spec("no_fault")
    rc, out, wall = b.run(["run", s], "no_fault")
    return row("no fault", f"exit {rc}; `{last_line(out, 'cells:')}`", counts(s), wall)


def node_lost(b: Bench, retries: int) -> dict[str, Any]:
    name = f"node_lost_retries{retries}"
    s = b.spec(name, executor={"kind": "ray", "max_retries": retries})
    t = time.perf_counter()
    proc = b.start(["run", s], name)
    b.until("every node was busy", proc, all_busy(s))
    b.cluster.remove_node(b.workers.pop())
    rc, out = b.finish(proc, name)
    happened = f"worker removed with 3 cells in flight: exit {rc}, `{last_line(out, 'cells:')}`"
    if rc != 0:
        rc2, out2, _ = b.run(["run", s], name + "_rerun")
        happened += f"; rerun: exit {rc2}, `{last_line(out2, 'cells:')}`"
    wall = time.perf_counter() - t
    b.workers.append(b.cluster.add_node(num_cpus=1))  # for the next scenario, untimed
    return row(f"worker node removed mid-cell, max_retries {retries}", happened, counts(s), wall)


def driver_killed(b: Bench) -> dict[str, Any]:
    s = b.spec("driver_killed")
    spec = load_spec(s)
    t = time.perf_counter()
    proc = b.start(["run", s], "driver_killed")
    b.until("two cells were stored", proc, lambda: len(list(spec.output_root.glob("cells/**/result.json"))) >= 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    st = matrix_status(spec).counts()
    staging = len(list((spec.output_root / ".staging").iterdir()))
    rc, out, _ = b.run(["run", s], "driver_killed_rerun")
    happened = (f"SIGKILL with {st['done']} stored: right after, status says running {st['running']} (the claims "
                f"died with the driver), {staging} staging folder(s); rerun: exit {rc}, `{last_line(out, 'cells:')}`")
    return row("driver SIGKILLed mid-run, then rerun", happened, counts(s), time.perf_counter() - t)


def concurrent(b: Bench) -> dict[str, Any]:
    s = b.spec("concurrent")
    t = time.perf_counter()
    procs = [b.start(["run", s], f"concurrent_{i}") for i in (1, 2)]
    done = [b.finish(p, f"concurrent_{i}") for i, p in zip((1, 2), procs)]
    happened = "; ".join(f"run {i}: exit {rc}, `{last_line(out, 'this run:')}`" for i, (rc, out) in enumerate(done, 1))
    return row("two runs of the spec started together", happened, counts(s), time.perf_counter() - t)


def refused(b: Bench, what: str, address: str, timeout: float) -> dict[str, Any]:
    s = b.spec("refused")
    rc, out, wall = b.run(["run", s, "--ray_timeout", timeout], "refused", address)
    error = last_line(out, "bbgic matrix: error:")
    stored = load_spec(s).output_root.exists()
    return row(what, f"exit {rc}{', output root written' if stored else ', nothing written'}: `{error}`",
               {"stored": 0, "failed": 0, "duplicated": 0}, wall)


def unsplit_reserved(b: Bench) -> dict[str, Any]:
    s = b.spec("reserved", aux=["train", "reserved"])
    rc, out, wall = b.run(["validate", s], "reserved_validate")
    rc2, out2, wall2 = b.run(["run", s], "reserved_run")
    first = last_line(out, "PROBLEM").split(", which")[0]
    verdict = out.strip().splitlines()[-1] if out.strip() else "-"
    ran = load_spec(s).output_root.exists()
    happened = (f"validate: exit {rc}, {verdict} (`{first}...`); run: exit {rc2}, "
                f"{'cells ran' if ran else 'refused before any cell'}")
    return row("aux reserved on a record without a held-out split", happened,
               counts(s) if ran else {"stored": 0, "failed": 0, "duplicated": 0}, wall + wall2)


def row(scenario: str, happened: str, c: dict[str, int], wall: float) -> dict[str, Any]:
    return {"scenario": scenario, "happened": happened, "done": c["stored"], "failed": c["failed"],
            "duplicated": c["duplicated"], "wall_s": round(wall, 1)}


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = ["# Matrix on a Ray cluster: the fault table", "",
             f"`{r['command']}`, {r['date']}; {m['cpu']}, {m['cores']} cores; Ray {r['ray']}; torch {m['torch']}. "
             "A three-node local cluster (`ray.cluster_utils.Cluster`, one CPU per node), a spec of 8 cells (FT and "
             "FST x 4 seeds on the fixture record). done = cells stored at the end; failed = failed computations; "
             "duplicated = computations of a cell beyond its first (from the runs' logs). Wall: the scenario's "
             "`bbgic` commands, cluster start-up excluded.", "",
             "| scenario | what happened | cells done/failed/duplicated | wall (s) |", "|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['scenario']} | {x['happened'].replace('|', '/')} | {x['done']}/{x['failed']}/"
                     f"{x['duplicated']} | {x['wall_s']:.0f} |")
    wall = {x["scenario"]: x["wall_s"] for x in r["rows"]}
    together, alone = wall.get("two runs of the spec started together"), wall.get("no fault")
    if together and alone:
        lines += ["", "Every driver is a Ray job with its own worker processes (one per node, each importing torch), "
                      "so with cells this small a run's wall is mostly start-up: the two runs together took "
                      f"{together / alone:.1f} x one run's wall, though each cell was computed once."]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="record, specs, logs and output roots (default: a temporary folder, "
                                                "removed at the end)")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for a run to reach a fault's moment")
    p.add_argument("--results", default=str(RESULTS), help="folder for matrix_faults.md and .json")
    p.add_argument("--report_only", action="store_true", help="rewrite matrix_faults.md from matrix_faults.json")
    a = p.parse_args(argv)
    out = Path(a.results)
    if a.report_only:
        atomic_write_text(out / "matrix_faults.md", render(json.loads((out / "matrix_faults.json").read_text())))
        return 0
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(ENV)  # the cluster's processes inherit it
    work = Path(a.work or tempfile.mkdtemp(prefix="bbgic-matrix-faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    command, machine = command_line(__file__, argv), machine_info()
    make_bb_record(work / "bb", "victim", n_train=200, n_test=60, train_steps=60, model_name="smallcnn", width=8,
                   trigger_size=8)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    rows = []
    try:
        b = Bench(work, cluster, a.wait)
        for step in (no_fault, lambda b: node_lost(b, 1), lambda b: node_lost(b, 0), driver_killed, concurrent):
            rows.append(step(b))
            print(rows[-1], flush=True)
        rows.append(refused(b, "address where nothing listens", f"127.0.0.1:{free_port()}", 30))
        with socket.socket() as silent:
            silent.bind(("0.0.0.0", 0))
            silent.listen(8)
            rows.append(refused(b, "address that accepts connections but is not Ray (`--ray_timeout 10`)",
                                f"127.0.0.1:{silent.getsockname()[1]}", 10))
        rows.append(unsplit_reserved(b))
    finally:
        cluster.shutdown()
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine,
              "ray": ray.__version__, "rows": rows}
    atomic_write_json(out / "matrix_faults.json", result)
    text = render(result)
    atomic_write_text(out / "matrix_faults.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
