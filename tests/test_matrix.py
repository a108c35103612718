"""The matrix runner: validation before work, resumable exactly-once execution, local and Ray, reports."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from backdoorbench_gic.matrix import (MatrixSpecError, collect_results, load_spec, matrix_status, run_matrix,
                                      validate_spec, write_report)
from backdoorbench_gic.matrix.runner import render_status
from backdoorbench_gic.testing import make_bb_record
from backdoorbench_gic.matrix.store import _pid_alive


@pytest.fixture(scope="module")
def bb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    make_bb_record(root, "victim", n_train=200, n_test=60, train_steps=60, model_name="smallcnn", width=8, trigger_size=8)
    return root


def write_spec(path: Path, bb_root: Path, out: str, **changes) -> Path:
    spec = {
        "name": "t", "output_root": out, "bb_root": str(bb_root), "attacks": ["victim"],
        "defenses": [{"name": "ft", "overrides": {"epochs": 1, "batch_size": 20}},
                     {"name": "fst", "overrides": {"epochs": 1, "batch_size": 20}}],
        "aux": ["train"], "aux_sizes": [{"ratio": 0.2}], "seeds": [0, 1], "defaults": {"device": "cpu"},
        "monitor_every": 0, "executor": {"kind": "local", "workers": 1},
    }
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec))
    return path


def cell_results(out: Path) -> list[Path]:
    return sorted(out.glob("cells/**/result.json"))


def test_local_run_resumes_and_skips_done_cells(bb_root, tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.yaml", bb_root, str(tmp_path / "out")))
    assert len(spec.cells()) == 4
    summary = run_matrix(spec)
    assert summary.counts == {"done": 4}
    st = matrix_status(spec).counts()
    assert st["done"] == 4 and st["pending"] == 0
    first = {p: p.stat().st_mtime_ns for p in cell_results(tmp_path / "out")}
    again = run_matrix(spec)
    assert again.counts == {}  # nothing to run
    assert {p: p.stat().st_mtime_ns for p in cell_results(tmp_path / "out")} == first
    for p in first:  # BackdoorBench-format files beside every result row
        assert (p.parent / "defense_result.pt").is_file() and list(p.parent.glob("*_df_summary.csv"))
    assert not any((tmp_path / "out" / ".staging").iterdir())


def test_named_gic_variants_run_in_their_own_folders(bb_root, tmp_path):
    """off and default in output_root, bn-reset as the matrix <name>-bn-reset beside it; every cell once; a failed
    variant cell is reported from its own folder."""
    spec = load_spec(write_spec(tmp_path / "s.yaml", bb_root, str(tmp_path / "out"), seeds=[0],
                                defenses=[{"name": "ft", "overrides": {"epochs": 1, "batch_size": 20}}],
                                gic={"off": None, "bn-reset": {"placement": "bn-reset"},
                                     "bad": {"placement": "bn-reset", "bn_batch_size": 0}}))
    assert [p.name for p in spec.parts()] == ["t", "t-bad", "t-bn-reset"]  # write_spec sorts the keys
    summary = run_matrix(spec, validate=False)
    assert summary.counts == {"done": 2, "failed": 1}
    off, reset = collect_results(tmp_path / "out"), collect_results(tmp_path / "out-bn-reset")
    assert list(off["gic"]) == [False] and list(reset["gic"]) == [True] and list(reset["matrix"]) == ["t-bn-reset"]
    assert reset["cell_id"].iloc[0] == spec.part("bn-reset").cells()[0].cell_id
    assert yaml.safe_load((tmp_path / "out-bn-reset" / "spec.yaml").read_text())["gic"] == [True]
    st = matrix_status(spec).counts()
    assert (st["done"], st["failed"]) == (2, 1)
    assert "out-bad/failures" in render_status(spec, matrix_status(spec))
    assert run_matrix(spec, validate=False, max_cells=0).counts == {}


def test_unknown_defense_or_missing_record_fails_before_running(bb_root, tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.yaml", bb_root, str(tmp_path / "out"),
                                attacks=["victim", "nosuchrecord"],
                                defenses=["ft", {"name": "ftt"}, {"name": "sau", "overrides": {"n_roundz": 1}}],
                                aux=["train", "reserved_sepia"]))
    problems = validate_spec(spec)
    text = "\n".join(problems)
    assert "nosuchrecord" in text and "'ftt'" in text and "'n_roundz'" in text
    with pytest.raises(MatrixSpecError):
        run_matrix(spec)
    assert not (tmp_path / "out" / "cells").exists()


def test_spec_structure_errors_name_the_key(bb_root, tmp_path):
    from backdoorbench_gic.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key\\(s\\) defences"):
        load_spec(write_spec(tmp_path / "s.yaml", bb_root, "o", defences=["ft"]))
    with pytest.raises(ConfigError, match="ratio"):
        load_spec(write_spec(tmp_path / "s.yaml", bb_root, "o", aux_sizes=[{"ratio": 2}]))
    with pytest.raises(ConfigError, match="eval_limit must be a positive"):
        load_spec(write_spec(tmp_path / "s.yaml", bb_root, "o", eval_limit=-5))
    with pytest.raises(ConfigError, match="'aux_options' must be a mapping"):
        load_spec(write_spec(tmp_path / "s.yaml", bb_root, "o", aux_options=["inversion_steps", 5]))


def test_gic_cells_validate_base_specific_keys_through_the_base(bb_root, tmp_path):
    """A base defense's own key (sau's n_rounds) is valid in a GIC cell; a misspelt one is still caught."""
    ok = load_spec(write_spec(tmp_path / "s.yaml", bb_root, "o", gic=[False, True],
                              defenses=[{"name": "sau", "overrides": {"n_rounds": 1}}]))
    assert validate_spec(ok) == []
    bad = load_spec(write_spec(tmp_path / "s.yaml", bb_root, "o", gic=[True],
                               defenses=[{"name": "sau", "overrides": {"n_roundz": 1}}]))
    assert any("n_roundz" in p and "GIC" in p for p in validate_spec(bad))


def test_spec_eval_limit_and_aux_options_reach_every_cell(bb_root, tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.yaml", bb_root, str(tmp_path / "out"), seeds=[0],
                                defenses=[{"name": "ft", "overrides": {"epochs": 1, "batch_size": 20}}],
                                aux=["synthetic:inversion"], aux_sizes=[{"n_per_class": 2}], eval_limit=20,
                                aux_options={"inversion_steps": 2, "inversion_batch_size": 20}))
    assert run_matrix(spec).counts == {"done": 1}
    row = collect_results(tmp_path / "out").iloc[0]
    assert row["eval_n_clean"] == 20 and row["aux_size"] == 20
    bad = load_spec(write_spec(tmp_path / "s2.yaml", bb_root, str(tmp_path / "out2"), seeds=[0],
                               defenses=[{"name": "ft", "overrides": {"epochs": 1, "batch_size": 20}}],
                               aux=["synthetic:inversion"], aux_sizes=[{"n_per_class": 2}],
                               aux_options={"inversion_steps": 0}))
    assert run_matrix(bad).counts == {"failed": 1}  # the option reached the source, which refused it
    # per-type options reach only their type: train would refuse an inversion option
    both = load_spec(write_spec(tmp_path / "s3.yaml", bb_root, str(tmp_path / "out3"), seeds=[0],
                                defenses=[{"name": "ft", "overrides": {"epochs": 1, "batch_size": 20}}],
                                aux=["train", "synthetic:inversion"], aux_sizes=[{"n_per_class": 2}],
                                aux_options_for={"synthetic:inversion": {"inversion_steps": 0}}))
    counts = run_matrix(both).counts
    assert counts == {"done": 1, "failed": 1}
    with pytest.raises(Exception, match="not in aux"):
        load_spec(write_spec(tmp_path / "s4.yaml", bb_root, "o", aux_options_for={"reserved_x": {}}))


def _wait_for(predicate, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _live_lock_pids(out: Path) -> list[int]:
    pids = []
    for lock in (out / ".locks").glob("*.json") if (out / ".locks").is_dir() else []:
        try:
            pids.append(int(json.loads(lock.read_text())["pid"]))
        except (ValueError, KeyError, OSError):
            pass
    return pids


def test_killed_worker_and_killed_run_resume_to_every_cell_exactly_once(bb_root, tmp_path):
    out = tmp_path / "out"
    spec_path = write_spec(tmp_path / "s.yaml", bb_root, str(out),
                           defenses=[{"name": "ft", "overrides": {"epochs": 12, "batch_size": 10}},
                                     {"name": "fst", "overrides": {"epochs": 12, "batch_size": 10}}],
                           seeds=[0, 1, 2], executor={"kind": "local", "workers": 2})
    env = {**os.environ, "BBGIC_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "backdoorbench_gic.cli", "matrix", "run", str(spec_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        pids = _wait_for(lambda: _live_lock_pids(out), 180, "a worker to start a cell")
        os.kill(pids[0], signal.SIGKILL)  # a worker dies mid-cell
        # then the whole run is killed mid-way (main process and workers)
        _wait_for(lambda: len(cell_results(out)) >= 1 and _live_lock_pids(out), 240, "a finished cell")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # SIGKILL is asynchronous: the driver can be reaped while a worker is still exiting
        _wait_for(lambda: not any(_pid_alive(p) for p in _live_lock_pids(out)), 60, "the killed workers to exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    spec = load_spec(spec_path)
    done_before = len(cell_results(out))
    assert 1 <= done_before < 6
    status = matrix_status(spec).counts()
    assert status["running"] == 0  # stale locks of killed processes are not "running"
    summary = run_matrix(spec, {"workers": 1})
    assert summary.counts.get("done", 0) == 6 - done_before
    results = cell_results(out)
    assert len(results) == 6
    ids = [json.loads(p.read_text())["cell_id"] for p in results]
    assert len(set(ids)) == 6  # every cell exactly once
    assert matrix_status(spec).counts() == {"done": 6, "running": 0, "failed": 0, "pending": 0, "total": 6}
    assert not list((out / ".staging").iterdir())  # no half-written cell left anywhere
    assert not (out / "failures").exists() or not any((out / "failures").iterdir())


def test_local_and_ray_give_identical_numbers(bb_root, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # a local Ray starts afresh even where the environment names another cluster (a CI host may run one)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    local = load_spec(write_spec(tmp_path / "a.yaml", bb_root, str(tmp_path / "local")))
    ray_spec = load_spec(write_spec(tmp_path / "b.yaml", bb_root, str(tmp_path / "ray"),
                                    executor={"kind": "ray", "local_num_cpus": 2, "num_cpus": 1}))
    run_matrix(local)
    try:
        assert run_matrix(ray_spec).counts == {"done": 4}
    finally:
        from backdoorbench_gic.matrix.executors import RayExecutor

        RayExecutor.shutdown()
    cols = ["cell_id", "acc_after", "asr_after", "ra_after", "der", "rir", "aux_size"]
    a = collect_results(tmp_path / "local")[cols].sort_values("cell_id").reset_index(drop=True)
    b = collect_results(tmp_path / "ray")[cols].sort_values("cell_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    # the same files, in the same places
    rel = lambda root: sorted(str(p.relative_to(root)) for p in root.glob("cells/**/*") if p.is_file()  # noqa: E731
                              and p.suffix in (".pt", ".csv", ".json", ".txt"))
    assert rel(tmp_path / "local") == rel(tmp_path / "ray")


def test_report_tables_and_plots(bb_root, tmp_path, monkeypatch):
    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "cache"))
    spec = load_spec(write_spec(tmp_path / "s.yaml", bb_root, str(tmp_path / "out"), defenses=[
        {"name": "ft", "overrides": {"epochs": 1, "batch_size": 20}}], gic=[False, True],
        gic_overrides={"gic_steps": 3, "gic_batch_size": 20}))
    assert run_matrix(spec).counts == {"done": 4}
    files = {p.name for p in write_report(spec.output_root)}
    assert {"results.csv", "leaderboard_train@r0.2.csv", "leaderboard_train@r0.2.md", "leaderboard_train@r0.2.tex",
            "gic_comparison.csv", "gic_comparison.md", "der_heatmap.png", "der_heatmap_gic.png",
            "acc_vs_asr.png"} <= files
    tidy = pd.read_csv(spec.output_root / "report" / "results.csv")
    assert len(tidy) == 4 and set(tidy["gic"]) == {True, False}
    md = (spec.output_root / "report" / "leaderboard_train@r0.2.md").read_text()
    assert "ft+gic C-Acc" in md and "±" in md and "| smallcnn | victim |" in md
    tex = (spec.output_root / "report" / "leaderboard_train@r0.2.tex").read_text()
    assert "\\begin{tabular}" in tex and "$\\pm$" in tex
    comp = pd.read_csv(spec.output_root / "report" / "gic_comparison.csv")
    assert comp.loc[0, "n_pairs"] == 2 and "der_diff" in comp.columns
