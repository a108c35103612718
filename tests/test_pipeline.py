"""One defense end to end: record -> auxiliary set -> defense -> evaluation -> BackdoorBench files."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from backdoorbench_gic.cli import main as bbgic
from backdoorbench_gic.models import build_model
from backdoorbench_gic.matrix.report import mixed_configs
from backdoorbench_gic.pipeline import DefenseRequest, config_fingerprint, default_variant, run_defense
from backdoorbench_gic.registry import DEFENSES
from backdoorbench_gic.testing import make_bb_record

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("pipe")
    make_bb_record(r, "victim", n_train=200, n_test=60, train_steps=60, model_name="smallcnn", width=8, trigger_size=8)
    return r


def test_run_defense_writes_backdoorbench_layout_and_tidy_row(root, monkeypatch):
    from backdoorbench_gic import auxdata

    checks = []
    check = auxdata.check_aux_request
    monkeypatch.setattr(auxdata, "check_aux_request", lambda *a, **k: checks.append(a[1]) or check(*a, **k))
    row = run_defense(DefenseRequest(result_file="victim", defense="ft", bb_root=str(root), device="cpu",
                                     overrides={"reserved_type": "train", "ratio": 0.25, "epochs": 2, "batch_size": 25},
                                     monitor_every=1, progress=False))
    out = root / "record" / "victim" / "defense" / "ft" / "cifar10_train"
    for name in ("defense_result.pt", "ft_df.csv", "ft_df_summary.csv", "result.json", "result.csv", "log/index.txt"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint").is_dir() and list((out / "log").glob("*.log"))
    assert checks == ["train"]  # the request is checked once, before the defenses load
    saved = torch.load(out / "defense_result.pt", weights_only=True)
    assert list(saved) == ["model_name", "num_classes", "model"] and saved["model_name"] == "smallcnn"
    build_model("smallcnn", 10, in_channels=3, width=8).load_state_dict(saved["model"], strict=True)
    index = [int(x) for x in (out / "log" / "index.txt").read_text().split()]
    assert len(index) == row["aux_size"] == 50 and len(set(index)) == 50
    df = pd.read_csv(out / "ft_df.csv", index_col=0)
    assert len(df) == 2 and {"test_acc", "test_asr", "test_ra", "train_epoch_loss_avg_over_batch"} <= set(df.columns)
    summary = pd.read_csv(out / "ft_df_summary.csv", index_col=0)
    assert summary.loc["last", "test_acc"] == pytest.approx(row["acc_after"])
    assert summary.loc["last", "test_asr"] == pytest.approx(row["asr_after"])
    stored = json.loads((out / "result.json").read_text())
    for key in ("attack", "defense", "aux_type", "seed", "acc_before", "asr_before", "ra_before", "acc_after",
                "asr_after", "ra_after", "der", "rir", "wall_seconds", "device"):
        assert key in stored, key
    assert stored["der"] == pytest.approx((max(0, row["asr_before"] - row["asr_after"])
                                           - max(0, row["acc_before"] - row["acc_after"]) + 1) / 2)
    # the victim's own numbers are cached in the cache directory, never next to the record (inputs are read-only)
    assert not list((root / "record" / "victim").glob("bbgic_*"))
    from backdoorbench_gic.utils.cache import cache_dir

    assert list((cache_dir() / "victim_metrics").glob("*.json"))


def test_an_aux_request_from_a_yaml_is_checked_once_as_resolved(root, tmp_path, monkeypatch):
    from backdoorbench_gic import auxdata

    checks = []
    check = auxdata.check_aux_request
    monkeypatch.setattr(auxdata, "check_aux_request", lambda *a, **k: checks.append(a[1]) or check(*a, **k))
    y = tmp_path / "ft.yaml"
    y.write_text("reserved_type: reserved_foo\nepochs: 1\n")
    with pytest.raises(auxdata.AuxDataError, match="reserved_foo"):
        run_defense(DefenseRequest(result_file="victim", defense="ft", bb_root=str(root), device="cpu",
                                   yaml_path=str(y), output_dir=str(tmp_path / "out"), progress=False))
    assert checks == ["reserved_foo"]


def test_same_seed_same_numbers_and_monitor_off(root, tmp_path):
    rows = [run_defense(DefenseRequest(result_file="victim", defense="fst", bb_root=str(root), device="cpu",
                                       output_dir=str(tmp_path / f"o{i}"), monitor_every=0, progress=False,
                                       overrides={"reserved_type": "train", "ratio": 0.2, "epochs": 1, "batch_size": 20}))
            for i in range(2)]
    assert rows[0]["acc_after"] == rows[1]["acc_after"] and rows[0]["asr_after"] == rows[1]["asr_after"]
    a = torch.load(tmp_path / "o0" / "defense_result.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "o1" / "defense_result.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_fingerprint_tracks_settings_not_per_run_keys():
    fp = lambda name, **ov: config_fingerprint(DEFENSES.get(name).from_sources("cifar10", None, ov))  # noqa: E731
    base = fp("sau")
    # seed, auxiliary choice and device differ between the cells of one entry by design
    assert fp("sau", random_seed=3, ratio=0.01, reserved_type="reserved_noise", device="cpu") == base
    assert fp("sau", lr=1e-3) != base and fp("sau", n_rounds=3) != base
    gic = DEFENSES.get("gic")
    with_base = lambda **ov: config_fingerprint(gic.from_sources("cifar10", None, {"base": "ft", **ov}))  # noqa: E731
    assert with_base() != with_base(epochs=7)  # the wrapped base defense's settings count too


def test_report_flags_an_entry_computed_with_two_configurations():
    rows = [{"dataset": "cifar10", "defense_label": "sau", "gic": False, "config_fingerprint": fp, "seed": s}
            for s, fp in enumerate(["aaa", "aaa", "bbb"])]
    rows.append({"dataset": "cifar10", "defense_label": "ft", "gic": False, "config_fingerprint": "ccc", "seed": 0})
    warnings = mixed_configs(pd.DataFrame(rows))
    assert len(warnings) == 1 and "sau" in warnings[0] and "aaa (2 cells)" in warnings[0] and "bbb (1 cells)" in warnings[0]
    assert mixed_configs(pd.DataFrame(rows[:2])) == []


def test_variant_names_follow_backdoorbenchER():
    assert default_variant("cifar10", "reserved_noise", None) == "cifar10_reserved_noise"
    assert default_variant("cifar10", "reserved", "./config/defense/ft/cifar10_reserved.yaml") == "cifar10_reserved"
    assert default_variant("fmnist", "mix:reserved+synthetic:inversion", None) == "fmnist_mix_reserved+synthetic_inversion"


def test_cli_defend_accepts_config_keys_as_flags_and_rejects_unknown(root, tmp_path, capsys):
    code = bbgic(["defend", "--result_file", "victim", "--bb_root", str(root), "--defense", "ft", "--device", "cpu",
                  "--reserved_type", "train", "--ratio", "0.2", "--epochs", "1", "--batch_size=20", "--no_progress",
                  "--output_dir", str(tmp_path / "out"), "--monitor_every", "0"])
    assert code == 0 and "DER" in capsys.readouterr().out
    code = bbgic(["defend", "--result_file", "victim", "--bb_root", str(root), "--defense", "ft", "--device", "cpu",
                  "--epochz", "3", "--output_dir", str(tmp_path / "bad")])
    assert code == 2
    err = capsys.readouterr().err
    assert "'epochz'" in err and "Did you mean epochs" in err
    assert not (tmp_path / "bad" / "defense_result.pt").exists()


def test_run_defense_script_with_backdoorbench_flags(root, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "run_defense.py"), "--result_file", "victim", "--bb_root", str(root),
                          "--defense", "ft", "--device", "cpu", "--dataset", "cifar10", "--reserved_type", "train",
                          "--ratio", "0.2", "--epochs", "1", "--output_dir", str(tmp_path / "o"), "--monitor_every", "0",
                          "--no_progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "defense_result.pt").is_file()


def test_gic_defense_through_the_pipeline(root, tmp_path, monkeypatch):
    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "cache"))
    row = run_defense(DefenseRequest(result_file="victim", defense="gic", bb_root=str(root), device="cpu",
                                     monitor_every=0, progress=False,
                                     overrides={"base": "ft", "reserved_type": "train", "ratio": 0.2, "epochs": 1,
                                                "batch_size": 20, "gic_steps": 5, "gic_batch_size": 20}))
    out = root / "record" / "victim" / "defense" / "gic-ft" / "cifar10_train"
    assert (out / "gic-ft_df_summary.csv").is_file() and (out / "defense_result.pt").is_file()
    assert row["defense"] == "gic-ft" and row["extra_gic_steps"] == 5.0
    assert "extra_bn_div_after" in row and "extra_drift_share" in row


def test_eval_limit_measures_every_run_on_the_same_fixed_subset(root, tmp_path):
    """CPU-scale matrices evaluate on a fixed subset: the same images for the victim and every cell, the sizes
    in the row, and a victim cache that never mixes subset and full numbers."""
    from backdoorbench_gic.evaluation import evaluate
    from backdoorbench_gic.evaluation import eval_sets
    from backdoorbench_gic.records import load_attack_record

    record = load_attack_record(root / "record" / "victim", root)
    a_clean, a_bd = eval_sets(record, 25)
    b_clean, b_bd = eval_sets(record, 25)
    assert len(a_clean) == 25 and len(a_bd) == 25
    assert torch.equal(a_clean.indices, b_clean.indices) and torch.equal(a_bd.indices, b_bd.indices)
    assert eval_sets(record, None)[0] is record.clean_test and len(eval_sets(record, 10_000)[0]) == len(record.clean_test)
    req = dict(result_file="victim", defense="ft", bb_root=str(root), device="cpu", monitor_every=0, progress=False,
               overrides={"reserved_type": "train", "ratio": 0.25, "epochs": 1, "batch_size": 25})
    row = run_defense(DefenseRequest(**req, output_dir=str(tmp_path / "sub"), eval_limit=25))
    full = run_defense(DefenseRequest(**req, output_dir=str(tmp_path / "full")))
    assert row["eval_n_clean"] == 25 and full["eval_n_clean"] == len(record.clean_test)
    victim = record.build_model().eval()
    expected = evaluate(victim, a_clean, a_bd)
    assert row["acc_before"] == pytest.approx(expected.acc) and row["asr_before"] == pytest.approx(expected.asr)
    assert not list((root / "record" / "victim").glob("bbgic_*"))
