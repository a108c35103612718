"""The post-purification probes (ASR-refresh, P-ASR with its clean control): settings, the checks that refuse a
probe before anything runs, the held-out halves, the retuning set, each probe's arithmetic, caching, and the
probes in a defense run (result.json, ``bbgic defend --probes``)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from backdoorbench_gic.bnstats import batchnorm_layers
from backdoorbench_gic.config import ConfigError
from backdoorbench_gic.evaluation import evaluate
from backdoorbench_gic.keys import Col
from backdoorbench_gic.probes import (ProbeError, Prober, ProbeSettings, check_probes, clean_control, control_config,
                                      load_purified, parse_probes, probe_line, refreshed, retune_set, retuned,
                                      split_halves, victim_schedule)

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
QUICK = {"control": {"epochs": 3, "batch_size": 32}, "retune": {"fraction": 0.2}}  # 60 images, 6 poisoned


@pytest.fixture()
def rec(backdoored_record):
    """conftest's backdoored smallcnn record (300 train images, 30 poisoned; 100 test images, target 0)."""
    return backdoored_record


# ---------------------------------------------------------------------------------------------------------
# settings and names
# ---------------------------------------------------------------------------------------------------------
def test_probe_names():
    assert parse_probes("retune, refresh") == ["refresh", "retune"] and parse_probes(None) == []
    assert parse_probes(["retune"]) == ["retune"] and parse_probes("") == []
    with pytest.raises(ProbeError, match="'refesh'.*refresh.*retune"):
        parse_probes("refesh,retune")


def test_settings_defaults_nesting_and_unknown_keys():
    s = ProbeSettings()
    assert (s.retune.fraction, s.retune.poison_share, s.retune.epochs, s.retune.lr, s.retune.sgd_momentum,
            s.retune.wd, s.retune.batch_size, s.retune.augment) == (0.01, 0.1, 5, 0.01, 0.9, 5e-4, 64, True)
    assert s.seed == 0 and s.control.model is None and s.refresh.batch_size == 256
    assert s.retune.budget(57000) == (570, 57) and s.retune.budget(1437) == (14, 1)
    t = ProbeSettings.from_dict({"retune.epochs": "3", "control": {"lr": 0.1}, "seed": 2})
    assert t.retune.epochs == 3 and t.control.lr == 0.1 and t.seed == 2 and t.retune.lr == 0.01
    assert ProbeSettings.from_dict({"retune.n": 40}).retune.budget(300) == (40, 4)
    with pytest.raises(ConfigError, match="'epoch'.*retune.*Did you mean epochs"):
        ProbeSettings.from_dict({"retune.epoch": 3})
    with pytest.raises(ConfigError, match="'retuen'"):
        ProbeSettings.from_dict({"retuen.epochs": 3})
    with pytest.raises(ConfigError, match="'fraction'.*<= 1"):
        ProbeSettings.from_dict({"retune": {"fraction": 2}})
    with pytest.raises(ConfigError, match="'poison_share'"):
        ProbeSettings.from_dict({"retune.poison_share": 0})


# ---------------------------------------------------------------------------------------------------------
# refused before anything runs
# ---------------------------------------------------------------------------------------------------------
def test_check_refuses_what_cannot_run(rec, tmp_path):
    check_probes(rec, ["refresh", "retune"], ProbeSettings.from_dict(QUICK))
    with pytest.raises(ProbeError, match="no poisoned image"):  # the default 1 % of 300 images is 3, none poisoned
        check_probes(rec, ["retune"])
    no_bd = dataclasses.replace(rec, bd_train_state=None, _views={})
    with pytest.raises(ProbeError, match="probe 'retune' \\(P-ASR\\).*bd_train.*holds no poisoned training data"):
        check_probes(no_bd, ["retune"])
    check_probes(no_bd, ["refresh"])  # refresh needs no training data
    no_bn = dataclasses.replace(rec, state_dict={k: v for k, v in rec.state_dict.items() if "running" not in k},
                                _views={})
    with pytest.raises(ProbeError, match="probe 'refresh' \\(ASR-refresh\\).*no BatchNorm"):
        check_probes(no_bn, ["refresh"])
    with pytest.raises(ProbeError, match="retuning budget of 301 images is larger than the clean training split.*300"):
        check_probes(rec, ["retune"], ProbeSettings.from_dict({"retune.n": 301}))
    with pytest.raises(ProbeError, match="needs 60 poisoned images but record r has 30"):
        check_probes(rec, ["retune"], ProbeSettings.from_dict({"retune.n": 200, "retune.poison_share": 0.3}))
    with pytest.raises(ProbeError, match="no poisoned image"):
        check_probes(rec, ["retune"], ProbeSettings.from_dict({"retune.n": 3}))
    with pytest.raises(ProbeError, match="control.model.*does not exist"):
        check_probes(rec, ["retune"], ProbeSettings.from_dict({"retune.n": 30, "control.model": str(tmp_path / "x")}))


def test_a_defense_run_refuses_bad_probes_before_anything_is_built(rec, monkeypatch):
    from backdoorbench_gic.pipeline import DefenseRequest, run_defense

    def boom(*a, **k):
        raise AssertionError("the victim was built before the probes were checked")

    monkeypatch.setattr(type(rec), "build_model", boom)
    req = DefenseRequest(result_file="r", defense="ft", bb_root=str(rec.bb_root), device="cpu",
                         overrides={"reserved_type": "train", "ratio": 0.2, "epochs": 1}, progress=False)
    with pytest.raises(ProbeError, match="retuning budget of 400 images"):
        run_defense(dataclasses.replace(req, probes=["retune"], probe_options={"retune.n": 400}), record=rec)
    with pytest.raises(ProbeError, match="without a probe"):
        run_defense(dataclasses.replace(req, probe_options={"retune.n": 40}), record=rec)
    with pytest.raises(ConfigError, match="'epoch'"):
        run_defense(dataclasses.replace(req, probes=["retune"], probe_options={"retune.epoch": 1}), record=rec)
    assert not (rec.record_dir / "defense").exists()  # nothing written


# ---------------------------------------------------------------------------------------------------------
# the data each probe uses
# ---------------------------------------------------------------------------------------------------------
def test_refresh_never_sees_a_measured_image(rec):
    refresh, clean_m, bd_m = split_halves(rec.clean_test, rec.clean_test, rec.bd_test)
    half = len(rec.clean_test) // 2
    assert sorted(refresh.indices.tolist()) == list(range(half))
    assert set(clean_m.indices.tolist()) == set(range(half, len(rec.clean_test)))
    assert bd_m.indices.min() >= half and set(bd_m.indices.tolist()) == {i for i in rec.bd_test.indices.tolist()
                                                                          if i >= half}
    sub = rec.bd_test.subset(range(0, len(rec.bd_test), 3))  # an eval_limit-style subset keeps its own images
    assert set(split_halves(rec.clean_test, rec.clean_test, sub)[2].indices.tolist()) <= set(sub.indices.tolist())


def test_retune_set_draw(rec):
    s = ProbeSettings.from_dict({"retune.n": 40, "retune.poison_share": 0.25}).retune
    data = retune_set(rec, s, seed=0)
    assert len(data) == 40 and int(data.poison.sum()) == 10
    assert len(set(data.indices.tolist())) == 40  # distinct training samples
    bd = rec.bd_train
    poisoned = set(torch.nonzero(bd.poison == 1).flatten().tolist())
    for i, (idx, flag) in enumerate(zip(data.indices.tolist(), data.poison.tolist())):
        source = bd if flag else rec.clean_train
        assert torch.equal(data.images[i], source.images[idx]) and int(data.labels[i]) == int(source.labels[idx])
        assert (idx in poisoned) == bool(flag)  # clean ones never poisoned
    assert (data.labels[data.poison == 1] == 0).all()  # the attack's label: target 0
    again, other = retune_set(rec, s, seed=0), retune_set(rec, s, seed=1)
    assert torch.equal(again.indices, data.indices) and not torch.equal(other.indices, data.indices)


# ---------------------------------------------------------------------------------------------------------
# each probe's arithmetic
# ---------------------------------------------------------------------------------------------------------
def test_refresh_estimates_the_statistics_of_the_first_half_exactly(rec):
    model = rec.build_model()
    refresh = split_halves(rec.clean_test, rec.clean_test, rec.bd_test)[0]
    net = refreshed(model, refresh, batch_size=len(refresh), device=CPU)  # one batch: the exact moments
    first_bn = batchnorm_layers(net)[0][1]
    x = refresh.float_images()
    with torch.no_grad():  # the first BatchNorm reads the first convolution of the normalised input
        h = model.net.stem[0]((x - model.mean) / model.std)
    assert torch.allclose(first_bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first_bn.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), model.parameters()))  # weights untouched
    assert torch.equal(batchnorm_layers(model)[0][1].running_mean, rec.state_dict["stem.1.running_mean"])
    with pytest.raises(ProbeError, match="probe 'refresh'.*no BatchNorm"):
        refreshed(nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), refresh, 64, CPU)


def test_asr_refresh_undoes_corrupted_statistics(rec):
    """A model whose BatchNorm statistics were scrambled loses its clean accuracy; re-estimating them on the first
    half gives it back on the second half: the probe measures what it says."""
    model = rec.build_model()
    with torch.no_grad():
        for _, bn in batchnorm_layers(model):
            bn.running_mean.add_(3.0)
            bn.running_var.mul_(50.0)
    p = Prober(rec, ["refresh"], clean_eval=rec.clean_test, bd_eval=rec.bd_test, device=CPU)
    m = p.measure(model)
    assert set(m) == {"asr_half", "acc_half", "asr_refresh", "acc_refresh"}
    assert m["acc_half"] <= 0.5 and m["acc_refresh"] >= m["acc_half"] + 0.3, m
    victim = p.measure(rec.build_model())
    assert victim["asr_refresh"] >= 0.9 and victim["asr_half"] == 1.0, victim  # a real backdoor survives a refresh


def test_retune_is_seeded_and_leaves_the_model_alone(rec):
    model = rec.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = ProbeSettings.from_dict({"retune.n": 40, "retune.epochs": 2}).retune
    data = retune_set(rec, s, 0)
    a, b = (retuned(model, data, s, 0, CPU) for _ in range(2))
    c = retuned(model, data, s, 1, CPU)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    assert not a.training


def test_retuning_teaches_a_clean_model_the_trigger_when_poison_dominates(rec):
    """P-ASR is ASR after retuning: a retuning set that is half poison, for long enough, implants the trigger even
    in a clean model, so the probe can report a high number (and the default's low share is a choice, not a
    limit)."""
    settings = ProbeSettings.from_dict({**QUICK, "retune": {"n": 60, "poison_share": 0.5, "epochs": 15,
                                                            "lr": 0.05}})
    control = clean_control(rec, settings, CPU)
    p = Prober(rec, ["retune"], settings, clean_eval=rec.clean_test, bd_eval=rec.bd_test, device=CPU)
    assert evaluate(control, rec.clean_test, rec.bd_test).asr <= 0.2
    assert p.measure(control)["p_asr"] >= 0.8


# ---------------------------------------------------------------------------------------------------------
# the clean control
# ---------------------------------------------------------------------------------------------------------
def test_control_is_trained_cached_and_replaceable(rec, tmp_path):
    settings = ProbeSettings.from_dict(QUICK)
    assert victim_schedule(rec) == {}  # the fixture has no info.pickle: the prototype defaults, then QUICK
    cfg = control_config(rec, settings.control, 0, "cpu")
    assert (cfg["attack"], cfg["pratio"], cfg["model"], cfg["width"], cfg["epochs"], cfg["batch_size"]) == (
        "prototype", 0.0, "smallcnn", 16, 3, 32)
    a = clean_control(rec, settings, CPU)
    from backdoorbench_gic.utils.cache import cache_dir

    entries = list((cache_dir().parent / "clean_control").glob("*.pt"))
    assert entries
    b = clean_control(rec, settings, CPU)  # served from the cache
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert all(not torch.equal(x, y) for x, y in zip(a.parameters(), rec.build_model().parameters()))
    torch.save(rec.state_dict, tmp_path / "clean_model.pth")  # a given clean model (here: the victim's weights)
    given = clean_control(rec, ProbeSettings.from_dict({"control.model": str(tmp_path)}), CPU)
    assert all(torch.equal(x, y) for x, y in zip(given.parameters(), rec.build_model().parameters()))


def test_control_reads_the_victims_schedule_from_our_info_pickle(rec, tmp_path):
    from backdoorbench_gic.utils.io import atomic_torch_save

    copy = dataclasses.replace(rec, record_dir=tmp_path, _views={})
    atomic_torch_save({"epochs": 7, "lr": 0.02, "batch_size": 32, "attack": "badnet", "pratio": 0.1},
                      tmp_path / "info.pickle")
    assert victim_schedule(copy) == {"epochs": 7, "lr": 0.02, "batch_size": 32}
    cfg = control_config(copy, ProbeSettings.from_dict({"control.epochs": 2}).control, 0, "cpu")
    assert (cfg["epochs"], cfg["lr"], cfg["batch_size"], cfg["pratio"]) == (2, 0.02, 32, 0.0)


# ---------------------------------------------------------------------------------------------------------
# one run's probes, and the probes in a defense run
# ---------------------------------------------------------------------------------------------------------
def test_row_caches_the_victim_and_names_its_columns(rec):
    settings = ProbeSettings.from_dict(QUICK)
    victim = rec.build_model()
    p = Prober(rec, ["refresh", "retune"], settings, clean_eval=rec.clean_test, bd_eval=rec.bd_test, device=CPU)
    row = p.row(victim, victim)
    for key in (Col.ASR_HALF_BEFORE, Col.ASR_REFRESH_BEFORE, Col.P_ASR_BEFORE, Col.ASR_HALF_AFTER,
                Col.ASR_REFRESH_AFTER, Col.P_ASR_AFTER, Col.P_ASR_CONTROL, Col.P_ACC_CONTROL, Col.PROBE_SECONDS,
                Col.CONTROL_SECONDS):
        assert key in row, key
    assert row[Col.PROBES] == "refresh,retune" and row[Col.RETUNE_N] == 60 and row[Col.RETUNE_N_POISON] == 6
    assert row[Col.REFRESH_N] == 50 and row[Col.HALF_N_BD] == int((rec.bd_test.indices >= 50).sum())
    # the purified model here is the victim: its numbers must equal the (cached) victim's, computed afresh
    for k in ("asr_half", "asr_refresh", "p_asr", "p_acc"):
        assert row[f"{k}_after"] == row[f"{k}_before"], k
    assert row[Col.ASR_HALF_BEFORE] == evaluate(victim, *split_halves(rec.clean_test, rec.clean_test,
                                                                      rec.bd_test)[1:]).asr
    line = probe_line(row)
    assert line.startswith("probes: ASR-refresh") and "P-ASR" in line and "clean control" in line
    assert probe_line({"attack": "x"}) is None


def test_probes_in_a_defense_run_and_on_its_defense_result(rec):
    from backdoorbench_gic.pipeline import DefenseRequest, run_defense

    row = run_defense(DefenseRequest(result_file="r", defense="ft", bb_root=str(rec.bb_root), device="cpu",
                                     overrides={"reserved_type": "train", "ratio": 0.2, "epochs": 2,
                                                "batch_size": 30},
                                     monitor_every=0, progress=False, probes=["refresh", "retune"],
                                     probe_options=QUICK, output_dir=str(rec.bb_root / "ftrun")), record=rec)
    stored = json.loads((rec.bb_root / "ftrun" / "result.json").read_text())
    for key in (Col.ASR_REFRESH_AFTER, Col.P_ASR_AFTER, Col.P_ASR_BEFORE, Col.P_ASR_CONTROL, Col.PROBE_SECONDS):
        assert stored[key] == pytest.approx(row[key]), key
    assert row["wall_seconds"] >= row[Col.PROBE_SECONDS] + row[Col.CONTROL_SECONDS]
    # any purified model, e.g. a defense_result.pt, probes the same through the loaders
    purified = load_purified(rec, rec.bb_root / "ftrun" / "defense_result.pt")
    again = Prober(rec, ["refresh", "retune"], ProbeSettings.from_dict(QUICK), clean_eval=rec.clean_test,
                   bd_eval=rec.bd_test, device=CPU).measure(purified)
    assert again["asr_refresh"] == pytest.approx(row[Col.ASR_REFRESH_AFTER])
    assert again["p_asr"] == pytest.approx(row[Col.P_ASR_AFTER])


def test_defend_prints_the_probes(rec, capsys):
    from backdoorbench_gic.cli import main as bbgic

    code = bbgic(["defend", "--result_file", "r", "--bb_root", str(rec.bb_root), "--defense", "ft", "--device", "cpu",
                  "--reserved_type", "train", "--ratio", "0.2", "--epochs", "1", "--no_progress", "--monitor_every",
                  "0", "--output_dir", str(rec.bb_root / "cli"), "--probes", "refresh",
                  "--probe_option", "refresh.batch_size=32"])
    out = capsys.readouterr().out
    assert code == 0 and "probes: ASR-refresh" in out and "P-ASR" not in out
    assert bbgic(["defend", "--result_file", "r", "--bb_root", str(rec.bb_root), "--defense", "ft", "--probes",
                  "retun"]) == 2
    assert "unknown probe(s) 'retun'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# the matrix: spec key, cells, leaderboard columns
# ---------------------------------------------------------------------------------------------------------
def _spec(rec, out, **changes) -> dict:
    spec = {"name": "p", "output_root": str(out), "bb_root": str(rec.bb_root), "attacks": ["r"],
            "defenses": [{"name": "ft", "overrides": {"epochs": 1, "batch_size": 30}}], "aux": ["train"],
            "aux_sizes": [{"ratio": 0.2}], "seeds": [0], "defaults": {"device": "cpu"}, "monitor_every": 0,
            "probes": ["retune", "refresh"], "probe_options": QUICK}
    spec.update(changes)
    return spec


def test_matrix_spec_takes_probes_and_checks_them(rec, tmp_path):
    from backdoorbench_gic.matrix.runner import validate_matrix
    from backdoorbench_gic.matrix.spec import parse_spec

    spec = parse_spec(_spec(rec, tmp_path / "o"))
    assert spec.probes == ["refresh", "retune"] and spec.to_dict()["probe_options"] == QUICK
    assert parse_spec(_spec(rec, tmp_path / "o", probes="refresh")).probes == ["refresh"]
    assert validate_matrix(spec) == []
    assert "probes" not in parse_spec(_spec(rec, tmp_path / "o", probes=[], probe_options={})).to_dict()
    with pytest.raises(ConfigError, match="unknown probe.*'rfresh'"):
        parse_spec(_spec(rec, tmp_path / "o", probes=["rfresh"]))
    with pytest.raises(ConfigError, match="'epoch'"):
        parse_spec(_spec(rec, tmp_path / "o", probe_options={"retune": {"epoch": 1}}))
    with pytest.raises(ConfigError, match="probe_options given without probes"):
        parse_spec(_spec(rec, tmp_path / "o", probes=[]))
    # what the record cannot probe stops every cell before any defense runs, as a single run's check would
    big = parse_spec(_spec(rec, tmp_path / "o", probe_options={"retune.n": 1000}))
    assert any("probe 'retune' (P-ASR): a retuning budget of 1000 images" in p for p in validate_matrix(big))


def test_probes_are_not_part_of_a_cells_identity(rec, tmp_path):
    """Probes run on copies of the final purified model, so they change none of a cell's defense numbers: the
    cells (ids, folders) and their requests' defense settings are those of the spec without probes."""
    from backdoorbench_gic.matrix.spec import parse_spec

    with_p, without = parse_spec(_spec(rec, tmp_path / "o")), parse_spec(_spec(rec, tmp_path / "o", probes=[],
                                                                               probe_options={}))
    assert [c.cell_id for c in with_p.cells()] == [c.cell_id for c in without.cells()]
    assert [c.relpath for c in with_p.cells()] == [c.relpath for c in without.cells()]
    a, b = with_p.cells()[0].request(with_p), without.cells()[0].request(without)
    assert (a.probes, a.probe_options, b.probes) == (["refresh", "retune"], QUICK, [])
    assert dataclasses.replace(a, probes=[], probe_options={}) == b


def test_matrix_cells_carry_the_probes_into_the_leaderboard(rec, tmp_path):
    from backdoorbench_gic.matrix import run_matrix, write_report
    from backdoorbench_gic.matrix.spec import parse_spec

    spec = parse_spec(_spec(rec, tmp_path / "o"))
    assert run_matrix(spec).counts == {"done": 1}
    cell = json.loads(next((tmp_path / "o" / "cells").rglob("result.json")).read_text())
    assert cell[Col.PROBES] == "refresh,retune" and cell[Col.P_ASR_CONTROL] is not None
    write_report(tmp_path / "o", plots=False)
    md = (tmp_path / "o" / "report" / "leaderboard_train@r0.2.md").read_text()
    for header in ("no defense ASR-refresh", "no defense P-ASR", "clean model P-ASR", "ft ASR (half)",
                   "ft ASR-refresh", "ft P-ASR", "probes: ASR-refresh"):
        assert header in md, header
    csv = (tmp_path / "o" / "report" / "leaderboard_train@r0.2.csv").read_text()
    assert "ft_P-ASR_mean" in csv and "control_clean model P-ASR_mean" in csv
    # the same cells with a probe their rows lack: kept as they are (not re-run), and named
    from backdoorbench_gic.matrix.runner import _done_without_probes
    from backdoorbench_gic.matrix.store import CellStore

    store = CellStore(tmp_path / "o")
    assert _done_without_probes(spec, store) == []
    assert _done_without_probes(parse_spec(_spec(rec, tmp_path / "o", probes=["refresh"])), store) == []
    other = parse_spec(_spec(rec, tmp_path / "o", probe_options={**QUICK, "retune.lr": 0.001}))
    assert _done_without_probes(other, store) == other.cells()  # probed, but under other settings
    # probing the stored purified model again, without the defense, gives the cell's probe numbers exactly
    from backdoorbench_gic.probes import probe_finished_cells

    assert probe_finished_cells(tmp_path / "o", rec.bb_root, tmp_path / "p", "refresh,retune", QUICK,
                                progress=False) == {"probed": 1, "skipped": 0}
    again = json.loads(next((tmp_path / "p" / "cells").rglob("result.json")).read_text())
    probe_cols = [k for k in cell if k.startswith(("asr_half", "asr_refresh", "acc_half", "acc_refresh", "p_asr",
                                                   "p_acc", "retune_n", "refresh_n", "half_n"))]
    assert len(probe_cols) == 18 and {k: again[k] for k in probe_cols} == {k: cell[k] for k in probe_cols}
    assert again["asr_after"] == cell["asr_after"] and again["cell_id"] == cell["cell_id"]
    assert probe_finished_cells(tmp_path / "o", rec.bb_root, tmp_path / "p", ["retune"], QUICK,
                                progress=False) == {"probed": 0, "skipped": 1}  # resumable
    with pytest.raises(ProbeError, match="retuning budget of 1000"):
        probe_finished_cells(tmp_path / "o", rec.bb_root, tmp_path / "q", ["retune"], {"retune.n": 1000})
    assert not (tmp_path / "q").exists()
    row_file = next((tmp_path / "o" / "cells").rglob("result.json"))
    row_file.write_text(json.dumps({**cell, Col.PROBES: "refresh"}))
    assert _done_without_probes(spec, store) == spec.cells()
