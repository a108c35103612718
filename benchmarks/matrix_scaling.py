"""Matrix runner throughput with 1, 2 (or more) local workers, and a kill-and-resume of a whole run.

Matrix issue targets, measured with the CLI a user runs (``bbgic matrix run|status|report``, each a subprocess):

- **cells per hour with 1 and 2 workers on this machine** (``--workers 1 2 4`` on a larger one): the same
  2 x 2 x 3 x 2 spec (attacks x defenses x aux x seeds) on Fashion-MNIST is run from an empty output root per
  worker count; W workers get ``--threads_total // W`` torch threads each (W = 1 runs in the ``bbgic`` process
  itself, so its threads come from OMP_NUM_THREADS, which this script sets). cells/hour = cells / wall hours,
  where the wall time is the whole ``bbgic matrix run`` (start-up, validation, record loading included).
  The table also gives the summed per-cell wall time / (W x run wall time): how busy the workers were.
- **done when** ``bbgic matrix run`` on that spec finishes, survives a kill and resume, and ``bbgic matrix report``
  writes the tables and plots: in a further empty root, ``bbgic matrix run`` is started in its own process group,
  SIGKILLed (workers included) once ``--kill_after`` cells are done and another is in flight, and run again; then
  every cell must have exactly one result.json (cell ids = the spec's, none twice), ``bbgic matrix status`` must
  say all done with nothing running or failed, no staging folder may be left, and ``bbgic matrix report`` must
  write its leaderboards (csv, md, tex) and plots (png).

Inputs: two attack records on ``fashion-mnist_split_5_seed_0`` under ``--bb_root`` (``--records``). What is
missing is made first and not timed: the split (``bbgic split --dataset fashion-mnist --split_ratio 0.05
--random_seed 0``; Fashion-MNIST is read from ./data or /usr/share/datasets/fashion-mnist) and the records, through
the spec's own ``attacks: [{record: NAME, generate: {...}}]`` entries (``bbgic matrix run SPEC --max_cells 0``
generates missing records and runs no cell). The specs, the logs of every command and the output roots
(``w1/``, ``w2/``, ..., ``kill/``) are under ``--work`` (default ``<bb_root>/matrix_scaling``); each output root is
emptied before its run. Results go to ``<results>/matrix_scaling.{md,json}`` (rows kept per machine and spec).

    python benchmarks/matrix_scaling.py --bb_root /data/bb            # the full benchmark (see --help for sizes)
    python benchmarks/matrix_scaling.py --bb_root /data/bb --workers 1 2 4 8
    python benchmarks/matrix_scaling.py --smoke --bb_root /tmp/bbs --results /tmp/bbs/results   # minutes, 1 seed
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from backdoorbench_gic.analysis import command_line, machine_info
from backdoorbench_gic.data.specs import split_name
from backdoorbench_gic.matrix import load_spec, matrix_status
from backdoorbench_gic.results import TIDY_ROW_FILE, read_summary_last
from backdoorbench_gic.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
BBGIC = [sys.executable, "-m", "backdoorbench_gic.cli"]


# ---------------------------------------------------------------------------------------------------------
# running bbgic
# ---------------------------------------------------------------------------------------------------------
def _rel(arg: object) -> str:
    """Paths relative to the current directory when under it, so reports carry no machine paths."""
    text = str(arg)
    if os.path.isabs(text):
        try:
            return os.path.relpath(text)
        except ValueError:  # pragma: no cover - another drive on Windows
            return text
    return text


def shown(cmd: list[str]) -> str:
    """The command as a user types it."""
    rest = cmd[len(BBGIC):] if cmd[:len(BBGIC)] == BBGIC else cmd
    return "bbgic " + " ".join(map(_rel, rest))


def env_for(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "BBGIC_NO_PROGRESS": "1"}


def bbgic(args: list[str], log: Path, threads: int, check: bool = True) -> tuple[float, int, str]:
    """Run ``bbgic ARGS`` to completion, output to ``log``; (wall seconds, exit code, output)."""
    cmd = BBGIC + [str(a) for a in args]
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shown(cmd)}   (OMP_NUM_THREADS={threads}; log {log})", flush=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env_for(threads), stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    text = log.read_text()
    if check and rc != 0:
        raise RuntimeError(f"{shown(cmd)} failed with exit code {rc}; last lines of {log}:\n"
                           + "\n".join(text.strip().splitlines()[-15:]))
    return wall, rc, text


# ---------------------------------------------------------------------------------------------------------
# inputs: the split, the spec, the records
# ---------------------------------------------------------------------------------------------------------
def ensure_split(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    name = split_name(a.dataset, int(100 * a.split_ratio), a.split_seed)
    meta = Path(a.bb_root) / "data" / name / "meta.txt"
    if meta.is_file():
        return {"split": name, "made": False}
    wall, _, _ = bbgic(["split", "--dataset", a.dataset, "--split_ratio", a.split_ratio, "--random_seed", a.split_seed,
                        "--bb_root", a.bb_root, "--no_progress"], work / "logs" / "split.log", a.threads_total)
    return {"split": name, "made": True, "wall_s": wall}


def write_spec(a: argparse.Namespace, path: Path, output_root: Path, workers: int, threads: int) -> Path:
    split = split_name(a.dataset, int(100 * a.split_ratio), a.split_seed)
    generate = {"dataset": split, "model": a.victim_model, "epochs": a.victim_epochs, "device": "cpu",
                "random_seed": 0, **({"width": a.victim_width} if a.victim_width else {})}
    spec = {
        "name": f"scaling-{output_root.name}",
        "output_root": str(output_root),
        "bb_root": str(Path(a.bb_root).resolve()),
        "attacks": [{"record": r, "generate": {"attack": atk, **generate}} for r, atk in zip(a.records, a.attacks)],
        "defenses": [{"name": d, "overrides": {"epochs": a.defense_epochs}} for d in a.defenses],
        "aux": a.aux,
        "aux_sizes": [{"n_per_class": a.n_per_class}],
        "seeds": a.seeds,
        "gic": [False],
        "defaults": {"device": "cpu"},
        "monitor_every": 0,
        "executor": {"kind": "local", "workers": workers, "threads_per_worker": threads},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def describe_records(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Each record's final C-Acc / ASR and epochs, read back from its attack CSVs."""
    out = []
    for r in a.records:
        d = Path(a.bb_root) / "record" / r
        row: dict[str, Any] = {"record": r}
        try:
            last = read_summary_last(d / "attack_df_summary.csv")
            row.update(test_acc=last.get("test_acc"), test_asr=last.get("test_asr"))
            row["epochs"] = max(0, len((d / "attack_df.csv").read_text().strip().splitlines()) - 1)
        except OSError:
            pass
        out.append(row)
    return out


def fresh_root(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)


# ---------------------------------------------------------------------------------------------------------
# what a finished root looks like
# ---------------------------------------------------------------------------------------------------------
def results_in(root: Path) -> list[Path]:
    return sorted((root / "cells").rglob(TIDY_ROW_FILE)) if (root / "cells").is_dir() else []


def check_complete(spec_path: Path) -> dict[str, Any]:
    """Exactly one result.json per cell of the spec, status all done, nothing left in staging or failures."""
    spec = load_spec(spec_path)
    root = spec.output_root
    expected = {c.cell_id for c in spec.cells()}
    files = results_in(root)
    ids = [json.loads(p.read_text()).get("cell_id") for p in files]
    counts = matrix_status(spec).counts()
    staging = list((root / ".staging").iterdir()) if (root / ".staging").is_dir() else []
    failures = list((root / "failures").iterdir()) if (root / "failures").is_dir() else []
    per_cell = {c.cell_id: len(list((root / c.relpath).glob(TIDY_ROW_FILE))) for c in spec.cells()}
    ok = (len(files) == len(expected) and sorted(ids) == sorted(expected) and set(per_cell.values()) == {1}
          and counts["done"] == counts["total"] == len(expected) and not staging and not failures)
    return {"ok": ok, "cells": len(expected), "result_files": len(files), "distinct_ids": len(set(ids)),
            "ids_match_spec": sorted(ids) == sorted(expected), "status": counts, "staging_left": len(staging),
            "failures_left": len(failures)}


def cell_rows(root: Path) -> dict[str, dict[str, Any]]:
    return {r["cell_id"]: r for r in (json.loads(p.read_text()) for p in results_in(root))}


def max_diff(a: dict[str, dict], b: dict[str, dict], key: str) -> float | None:
    common = set(a) & set(b)
    vals = [abs(float(a[c][key]) - float(b[c][key])) for c in common
            if a[c].get(key) is not None and b[c].get(key) is not None]
    return max(vals) if vals else None


# ---------------------------------------------------------------------------------------------------------
# the measurements
# ---------------------------------------------------------------------------------------------------------
def timed_run(a: argparse.Namespace, work: Path, workers: int) -> dict[str, Any]:
    threads = max(1, a.threads_total // workers)
    root = work / f"w{workers}"
    fresh_root(root)
    spec_path = write_spec(a, work / f"spec_w{workers}.yaml", root, workers, threads)
    wall, _, _ = bbgic(["matrix", "run", spec_path], work / "logs" / f"run_w{workers}.log",
                       threads if workers == 1 else 1)
    check = check_complete(spec_path)
    rows = cell_rows(root)
    cell_s = [float(r.get("wall_seconds", 0.0)) for r in rows.values()]
    n = check["result_files"]
    out = {"workers": workers, "threads_per_worker": threads, "cells": n, "wall_s": wall,
           "cells_per_hour": n / (wall / 3600) if wall > 0 else None,
           "cell_wall_s_mean": sum(cell_s) / len(cell_s) if cell_s else None,
           "busy": sum(cell_s) / (workers * wall) if wall > 0 else None, "complete": check,
           "command": shown(BBGIC + ["matrix", "run", str(spec_path)]), "spec": str(spec_path)}
    print(f"  {workers} worker(s) x {threads} thread(s): {n} cells in {wall:.0f} s = {out['cells_per_hour']:.0f} "
          f"cells/hour (complete: {check['ok']})", flush=True)
    return out


def _locks(root: Path) -> list[Path]:
    return list((root / ".locks").glob("*.json")) if (root / ".locks").is_dir() else []


def kill_and_resume(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    workers = a.kill_workers
    threads = max(1, a.threads_total // workers)
    root = work / "kill"
    fresh_root(root)
    spec_path = write_spec(a, work / "spec_kill.yaml", root, workers, threads)
    total = len(load_spec(spec_path).cells())
    kill_after = a.kill_after or max(1, total // 3)
    cmd = BBGIC + ["matrix", "run", str(spec_path)]
    log = work / "logs" / "kill_first.log"
    print(f"$ {shown(cmd)}   (SIGKILL to its process group once {kill_after} of {total} cells are done; log {log})",
          flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env_for(threads if workers == 1 else 1), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        killed, in_flight, reached = False, 0, None
        try:
            while proc.poll() is None:
                done = len(results_in(root))
                if done >= kill_after:
                    reached = reached or time.perf_counter()
                    locks = _locks(root)
                    # kill with a cell in flight when there is one; don't wait for one forever
                    if locks or time.perf_counter() - reached > a.kill_wait:
                        in_flight = len(locks)
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = True
                        break
                time.sleep(0.2)
        finally:
            if proc.poll() is None and not killed:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first_wall = time.perf_counter() - t0
    done_at_kill = len(results_in(root))
    spec = load_spec(spec_path)
    # SIGKILL takes effect asynchronously: the workers (children of the killed bbgic) may still be tearing down
    # for a moment after it; a cell counts as running while its lock's process is alive, so wait for them
    settle = time.perf_counter()
    after_kill = matrix_status(spec).counts()
    while after_kill["running"] and time.perf_counter() - settle < a.kill_wait:
        time.sleep(0.2)
        after_kill = matrix_status(spec).counts()
    settle_s = time.perf_counter() - settle
    staging_after_kill = len(list((root / ".staging").iterdir())) if (root / ".staging").is_dir() else 0
    print(f"  killed={killed} after {first_wall:.0f} s: {done_at_kill} cells done, {in_flight} in flight; status "
          f"{settle_s:.1f} s later {after_kill}", flush=True)
    status_text = bbgic(["matrix", "status", spec_path], work / "logs" / "kill_status_after_kill.log", 1)[2]
    resume_wall, _, resume_text = bbgic(["matrix", "run", spec_path], work / "logs" / "kill_resume.log",
                                        threads if workers == 1 else 1)
    final_status = bbgic(["matrix", "status", spec_path], work / "logs" / "kill_status_final.log", 1)[2]
    check = check_complete(spec_path)
    _, _, report_text = bbgic(["matrix", "report", spec_path], work / "logs" / "report.log", 1)
    written = [Path(line.strip()) for line in report_text.splitlines() if line.strip().startswith(str(root))]
    names = sorted(p.name for p in written if p.is_file())
    tables = [n for n in names if n.endswith((".csv", ".md", ".tex"))]
    plots = [n for n in names if n.endswith(".png")]
    found = re.search(r"(\d+) of (\d+) cells to run", resume_text)
    rerun = int(found.group(1)) if found else None
    ok = (killed and 0 < done_at_kill < total and after_kill["running"] == 0 and check["ok"]
          and rerun == total - done_at_kill
          and any(n.startswith("leaderboard_") for n in tables) and bool(plots))
    print(f"  resumed in {resume_wall:.0f} s; every cell exactly once: {check['ok']}; report: {len(tables)} tables, "
          f"{len(plots)} plots -> {'PASS' if ok else 'FAIL'}", flush=True)
    return {"ok": ok, "workers": workers, "threads_per_worker": threads, "cells": total, "kill_after": kill_after,
            "killed": killed, "first_run_wall_s": first_wall, "done_at_kill": done_at_kill,
            "in_flight_at_kill": in_flight,
            "status_after_kill": after_kill, "kill_settle_s": settle_s, "status_after_kill_text": status_text.strip().splitlines()[-1:],
            "staging_left_by_kill": staging_after_kill, "resume_wall_s": resume_wall, "resume_cells_run": rerun,
            "final_status_text": final_status.strip().splitlines()[-1:], "complete": check,
            "report_dir": str(root / "report"), "report_tables": tables, "report_plots": plots,
            "commands": [shown(cmd) + "   # SIGKILLed", shown(cmd), shown(BBGIC + ["matrix", "status", str(spec_path)]),
                         shown(BBGIC + ["matrix", "report", str(spec_path)])]}


# ---------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------
def render(results: dict[str, Any]) -> str:
    lines = ["# Matrix runner: cells per hour, kill and resume", "",
             "Each row set: one spec (attacks x defenses x auxiliary types x seeds on Fashion-MNIST) run by "
             "`bbgic matrix run` from an empty output root per worker count; W workers get threads_total / W torch "
             "threads each. cells/hour = cells / wall hours of the whole command. busy = summed per-cell wall time / "
             "(W x wall). Then a separate root is killed (SIGKILL to the process group) mid-run and resumed. "
             "How to rerun: `python benchmarks/matrix_scaling.py --help`.", ""]
    for key, r in results.items():
        m, s = r["machine"], r["settings"]
        nan = float("nan")
        recs = "; ".join(f"{x['record']} (C-Acc {x.get('test_acc', nan):.3f}, ASR {x.get('test_asr', nan):.3f}, "
                         f"{x.get('epochs', '?')} epochs)" for x in r["records"])
        lines += [f"## {key}", "",
                  f"Machine: {m['cpu']}, {m['cores']} cores{', GPU ' + m['gpu'] if m.get('gpu') else ''}; load average "
                  f"at start {m.get('load_avg')}; torch {m['torch']}; {r['date']}; `{r['command']}`", "",
                  f"Spec: {r['spec_shape']} = {r['cells']} cells; defenses {', '.join(s['defenses'])} "
                  f"({s['defense_epochs']} epochs), aux {', '.join(s['aux'])} at {s['n_per_class']} per class, seeds "
                  f"{s['seeds']}, device cpu. Records: {recs}.", "",
                  "| workers | threads / worker | cells | wall (s) | cells / hour | mean cell wall (s) | busy | "
                  "all cells once | command |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in r["scaling"]:
            lines.append(f"| {t['workers']} | {t['threads_per_worker']} | {t['cells']} | {t['wall_s']:.0f} | "
                         f"{t['cells_per_hour']:.0f} | {t['cell_wall_s_mean']:.1f} | {100 * t['busy']:.0f} % | "
                         f"{'yes' if t['complete']['ok'] else 'NO'} | `{t['command']}` |")
        if r.get("same_numbers"):
            lines += ["", "Largest difference of a cell's numbers between the roots (threads differ, so float sums "
                          "may too): " + ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} -"
                                                   for k, v in r["same_numbers"].items())]
        k = r.get("kill")
        if k:
            verdict = "PASS" if k["ok"] else "FAIL"
            lines += ["", f"Kill and resume ({k['workers']} worker(s)): **{verdict}**. SIGKILL after "
                          f"{k['first_run_wall_s']:.0f} s with {k['done_at_kill']} of {k['cells']} cells done and "
                          f"{k['in_flight_at_kill']} in flight; {k.get('kill_settle_s', 0):.1f} s later (the killed "
                          f"processes gone) status {k['status_after_kill']} (stale locks of killed processes do not "
                          f"count as running), {k['staging_left_by_kill']} staging folder(s) "
                          f"left. The resumed run ran {k['resume_cells_run']} cells in {k['resume_wall_s']:.0f} s. "
                          f"Afterwards: {k['complete']['result_files']} "
                          f"result.json for {k['complete']['cells']} cells, {k['complete']['distinct_ids']} distinct "
                          f"ids matching the spec: {k['complete']['ids_match_spec']}; status "
                          f"`{' '.join(k['final_status_text'])}`; staging left {k['complete']['staging_left']}, "
                          f"failures {k['complete']['failures_left']}. `bbgic matrix report` wrote "
                          f"{', '.join(k['report_tables'])} and {', '.join(k['report_plots'])} under "
                          f"{k['report_dir']}.",
                      "", "Commands: " + "; ".join(f"`{c}`" for c in k["commands"])]
        if r.get("prep"):
            lines += ["", "Untimed preparation: " + "; ".join(f"`{c}`" for c in r["prep"])]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bb_root", required=True, help="BackdoorBench root: data/ (the split) and record/ (the victims)")
    p.add_argument("--records", nargs=2, default=["badnet_fm_small", "blended_fm_small"])
    p.add_argument("--attacks", nargs=2, default=["badnet", "blended"], help="attack of each record, if generated")
    p.add_argument("--victim_model", default="smallcnn")
    p.add_argument("--victim_width", type=int, default=None, help="default: the model's (smallcnn: 32)")
    p.add_argument("--victim_epochs", type=int, default=3)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--split_ratio", type=float, default=0.05)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--defenses", nargs="+", default=["ft", "fst"])
    p.add_argument("--defense_epochs", type=int, default=5)
    p.add_argument("--aux", nargs="+", default=["reserved", "reserved_noise", "reserved_brightness"])
    p.add_argument("--n_per_class", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--threads_total", type=int, default=os.cpu_count() or 1,
                   help="CPU threads shared by the workers (default: every core)")
    p.add_argument("--kill_workers", type=int, default=None, help="workers of the kill-and-resume run (default: the "
                                                                    "largest of --workers)")
    p.add_argument("--kill_after", type=int, default=None, help="cells done before the kill (default: a third)")
    p.add_argument("--kill_wait", type=float, default=30.0,
                   help="seconds to wait for a cell in flight before killing, and for the killed processes to go")
    p.add_argument("--skip_kill", action="store_true")
    p.add_argument("--work", default=None, help="specs, logs and output roots (default <bb_root>/matrix_scaling)")
    p.add_argument("--results", default=str(RESULTS), help="folder for matrix_scaling.md and .json")
    p.add_argument("--smoke", action="store_true", help="1 seed, 1-epoch victims and defenses, 5 images per class, "
                                                         "smallcnn width 8, records named *_smoke")
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.victim_epochs, a.defense_epochs, a.n_per_class = [0], 1, 1, 5
        a.victim_width = a.victim_width or 8
        a.records = [r if r.endswith("_smoke") else f"{r}_smoke" for r in a.records]
    a.bb_root = str(Path(a.bb_root).resolve())
    a.kill_workers = a.kill_workers or max(a.workers)
    work = Path(a.work or Path(a.bb_root) / "matrix_scaling").resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = command_line(__file__, argv)
    machine = machine_info()

    print(f"== inputs under {a.bb_root}", flush=True)
    split = ensure_split(a, work)
    prep = [] if not split["made"] else [
        f"bbgic split --dataset {a.dataset} --split_ratio {a.split_ratio} --random_seed {a.split_seed} "
        f"--bb_root {a.bb_root} ({split['wall_s']:.0f} s)"]
    missing = [r for r in a.records if not (Path(a.bb_root) / "record" / r / "attack_result.pt").is_file()]
    if missing:  # generated through the spec's attacks: generate entries, untimed; --max_cells 0 runs no cell
        gen_workers = min(len(missing), max(a.workers))
        gen_threads = max(1, a.threads_total // gen_workers)
        spec_path = write_spec(a, work / "spec_generate.yaml", work / "generate", gen_workers, gen_threads)
        wall, _, _ = bbgic(["matrix", "run", spec_path, "--max_cells", "0"], work / "logs" / "generate.log",
                           gen_threads if gen_workers == 1 else 1)
        prep.append(f"bbgic matrix run {spec_path} --max_cells 0 (generated {', '.join(missing)}: {wall:.0f} s)")
    records = describe_records(a)
    for r in records:
        print(f"  record {r['record']}: C-Acc {r.get('test_acc')} ASR {r.get('test_asr')} ({r.get('epochs')} epochs)")

    print("== cells per hour", flush=True)
    scaling = [timed_run(a, work, w) for w in a.workers]
    rows = [cell_rows(work / f"w{w}") for w in a.workers]
    same = {}
    if len(rows) > 1:
        for key in ("acc_after", "asr_after", "der"):
            diffs = [max_diff(rows[0], other, key) for other in rows[1:]]
            diffs = [d for d in diffs if d is not None]
            same[key] = max(diffs) if diffs else None
    kill = None
    if not a.skip_kill:
        print("== kill and resume", flush=True)
        kill = kill_and_resume(a, work)

    cells = scaling[0]["cells"] if scaling else (kill or {}).get("cells")
    shape = f"{len(a.records)} x {len(a.defenses)} x {len(a.aux)} x {len(a.seeds)}"
    key = f"{shape} spec on {machine['cpu']} ({machine['cores']} cores){' (smoke)' if a.smoke else ''}"
    settings = {k: getattr(a, k) for k in ("records", "attacks", "victim_model", "victim_width", "victim_epochs",
                                           "defenses", "defense_epochs", "aux", "n_per_class", "seeds", "workers",
                                           "threads_total", "kill_workers", "smoke")}
    out = Path(a.results)
    store = out / "matrix_scaling.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    results[key] = {"machine": machine, "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "settings": settings, "spec_shape": shape, "cells": cells, "records": records, "prep": prep,
                    "scaling": scaling, "same_numbers": same, "kill": kill, "work": str(work)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(store, results)
    text = render(results)
    atomic_write_text(out / "matrix_scaling.md", text)
    print(text)
    print(f"wrote {out / 'matrix_scaling.md'} (rows kept in {store.name}); specs, logs and roots under {work}")
    ok = all(t["complete"]["ok"] for t in scaling) and (kill is None or kill["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
