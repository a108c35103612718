"""Issue 27, what a new user sees: errors that name the fix, outputs that say where they wrote, help without
reST markup, the demo's reading by the README's success rule."""
from __future__ import annotations

import argparse

import pytest

from backdoorbench_gic import environment
from backdoorbench_gic.cli import build_parser, main

MISMATCH = "operator torchvision::nms does not exist"


# ---------------------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------------------
def _command_paths() -> list[list[str]]:
    top = build_parser(None)
    paths = []
    for name in next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices:
        sub = next(a for a in build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
        stack = [([name], sub.choices[name])]
        while stack:
            path, p = stack.pop()
            paths.append(path)
            stack += [(path + [n], sp) for a in p._actions if isinstance(a, argparse._SubParsersAction)
                      for n, sp in a.choices.items()]
    return paths


def _help(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_no_rest_markup_in_any_help(capsys):
    from backdoorbench_gic.commands.defend import main as run_defense_main
    from backdoorbench_gic.demo import main as demo_main

    outputs = {"bbgic": _help(capsys, main, ["--help"])}
    for path in _command_paths():
        outputs[" ".join(path)] = _help(capsys, main, path + ["--help"])
    outputs["defend --defense gic"] = _help(capsys, main, ["defend", "--defense", "gic", "--help"])
    outputs["run_defense.py (demo)"] = _help(capsys, demo_main, ["--help"])
    outputs["run_defense.py --result_file"] = _help(capsys, run_defense_main, ["--help"])
    assert {"demo", "defend", "aux-quality", "aux-export", "bb-run", "calibrate", "inspect"} <= set(outputs)
    for where, text in outputs.items():
        assert "``" not in text and ":mod:`" not in text and ":func:`" not in text, where


# ---------------------------------------------------------------------------------------------------------
# suggestions
# ---------------------------------------------------------------------------------------------------------
def test_a_transposed_defense_name_suggests_the_defense():
    from backdoorbench_gic.registry import DEFENSES, UnknownNameError, suggestions, transpositions

    assert transpositions("fts") == {"tfs", "fst"}
    assert suggestions("fts", ["ft", "ft_sam", "ft-sam", "fst", "sau"])[0] == "fst"
    with pytest.raises(UnknownNameError, match="Did you mean 'fst'"):
        DEFENSES.resolve("fts")


# ---------------------------------------------------------------------------------------------------------
# a torch/torchvision build mismatch
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture()
def mismatched(monkeypatch):
    """torch's CPU build with torchvision's PyPI build, whose import fails the way it does then (simulated)."""
    versions = {"torch": "2.14.1+cpu", "torchvision": "0.29.1"}
    monkeypatch.setattr(environment, "_version", versions.get)
    monkeypatch.setattr(environment, "_CHECKED", [])
    imports = []

    def fail():
        imports.append(1)
        raise RuntimeError(MISMATCH)

    monkeypatch.setattr(environment, "_import_torchvision", fail)
    return imports


def test_the_reinstall_command_pins_both_builds_to_torch_s_index():
    cmd = environment.reinstall_command("2.14.1+cpu", "0.29.1")
    assert cmd == ("python -m pip install --force-reinstall --no-deps torch==2.14.1+cpu torchvision==0.29.1+cpu "
                   "--index-url https://download.pytorch.org/whl/cpu")
    assert environment.reinstall_command("2.14.1", "0.27.0").endswith("torch==2.14.1 torchvision==0.29.*")
    assert environment.versions_disagree("2.14.1+cpu", "0.29.1") and environment.versions_disagree("2.14.1", "0.28.0")
    assert not environment.versions_disagree("2.14.1+cu130", "0.29.1+cu130")


def test_a_build_mismatch_is_reported_once_at_start_up_with_the_fix(mismatched, capsys):
    assert main(["inspect", "no_such_record"]) == 2
    err = capsys.readouterr().err
    assert err.count("come from different builds") == 1 and "not your record" in err and MISMATCH in err
    assert "pip install --force-reinstall --no-deps torch==2.14.1+cpu torchvision==0.29.1+cpu" in err
    assert "INVALID" not in err and "no_such_record" not in err  # stopped before the command ran
    assert main(["inspect", "no_such_record"]) == 2 and len(mismatched) == 1  # detected once per process


def test_a_sound_install_is_not_imported_at_start_up(monkeypatch):
    monkeypatch.setattr(environment, "_version", {"torch": "2.14.1+cu130", "torchvision": "0.29.1+cu130"}.get)
    monkeypatch.setattr(environment, "_CHECKED", [])
    monkeypatch.setattr(environment, "_import_torchvision", lambda: pytest.fail("imported torchvision"))
    environment.check_torch_build()


def test_inspect_and_commands_blame_the_install_not_the_record(bb_record, monkeypatch, capsys):
    from backdoorbench_gic.commands import listing
    from backdoorbench_gic.inspection import inspect_record
    from backdoorbench_gic.records import AttackRecord

    root, record_dir = bb_record
    monkeypatch.setattr(environment, "_version", {"torch": "2.14.1+cpu", "torchvision": "0.29.1+cpu"}.get)
    monkeypatch.setattr(environment, "_CHECKED", [])  # the versions agree: the start-up check passes

    def broken(self, normalize=True):
        try:
            raise RuntimeError(MISMATCH)
        except RuntimeError as exc:
            raise ValueError("model registry failed to load") from exc

    monkeypatch.setattr(AttackRecord, "build_model", broken)
    with pytest.raises(environment.TorchBuildMismatch, match="different builds"):
        inspect_record(record_dir, root, evaluate=True)
    assert main(["inspect", str(record_dir), "--bb_root", str(root), "--evaluate"]) == 2
    err = capsys.readouterr().err
    assert "different builds" in err and "--index-url https://download.pytorch.org/whl/cpu" in err
    monkeypatch.setattr(listing, "run", lambda args: (_ for _ in ()).throw(RuntimeError(MISMATCH)))
    assert main(["list"]) == 2 and "different builds" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# records and checkouts
# ---------------------------------------------------------------------------------------------------------
def test_a_truncated_record_says_re_copy_or_re_create(fresh_bb_record):
    from backdoorbench_gic.records import load_attack_record

    root, record_dir = fresh_bb_record
    path = record_dir / "attack_result.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or damaged .*re-copy or re-create the record") as exc:
        load_attack_record(record_dir, root)
    assert "miniz" not in str(exc.value)


def test_bb_run_outside_a_checkout_says_cd_or_bb_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bb-run", "defense/ft.py", "--result_file", "r"]) == 2
    assert "cd into your checkout or pass --bb_root" in capsys.readouterr().err


def test_inspect_prints_percent(bb_record):
    from backdoorbench_gic.inspection import inspect_record

    root, record_dir = bb_record
    report = inspect_record(record_dir, root, evaluate=True, device="cpu")
    assert report.valid and report.facts["evaluated"].count("%") == 3
    assert report.facts["logged (attack_df_summary.csv, last)"].count("%") == 3


# ---------------------------------------------------------------------------------------------------------
# written paths
# ---------------------------------------------------------------------------------------------------------
def test_defend_says_where_it_wrote(fresh_bb_record, capsys):
    root, record_dir = fresh_bb_record
    assert main(["defend", "--result_file", record_dir.name, "--bb_root", str(root), "--defense", "ft",
                 "--device", "cpu", "--reserved_type", "train", "--ratio", "0.2", "--epochs", "1", "--no_progress",
                 "--monitor_every", "0"]) == 0
    out = capsys.readouterr().out
    folder = record_dir / "defense" / "ft" / "cifar10_train"
    assert out.splitlines()[-1].endswith(f"to {folder}") and (folder / "defense_result.pt").is_file()


# ---------------------------------------------------------------------------------------------------------
# the demo's reading
# ---------------------------------------------------------------------------------------------------------
def test_the_demo_reading_calls_each_row_by_the_success_rule_and_says_what_gic_did():
    from backdoorbench_gic.demo import reading

    base = {"acc_before": 0.99, "asr_before": 0.96, "eval_n_clean": 359}
    rows = [{**base, "defense": "fst", "aux_type": "reserved", "acc_after": 0.985, "asr_after": 0.05},
            {**base, "defense": "ft", "aux_type": "reserved", "acc_after": 0.98, "asr_after": 0.22},
            {**base, "defense": "ft", "aux_type": "noise", "acc_after": 0.90, "asr_after": 0.02},
            {**base, "defense": "gic-fst", "aux_type": "reserved", "acc_after": 0.99, "asr_after": 0.10,
             "extra_gic_delta": 16 / 255, "extra_bn_div_before": 0.0054, "extra_bn_div_after": 0.0033,
             "extra_drift_class": 0, "extra_drift_share": 0.103, "extra_drift_ratio": 1.03,
             "extra_drift_raw_share": 0.1, "extra_drift_flag": 0.0}]
    text = reading(rows)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120
    assert lines[0].startswith("Reading (success: ASR after <= 10 % and C-Acc at most 5 points below")
    assert lines[1] == "  fst on reserved: success: ASR 96.0% -> 5.0%, C-Acc 99.0% -> 98.5%"
    assert lines[2].startswith("  ft on reserved: failure (ASR 22.0% > 10 %)")
    assert lines[3].startswith("  ft on noise: failure (C-Acc 9.0 points down)")
    assert lines[4].startswith("  gic-fst on reserved: success")  # 10 % itself is a success
    gic = " ".join(" ".join(lines[5:]).split())
    assert "D_BN 0.0054 -> 0.0033" in gic and "predicts class 0" in gic and "not concentrated" in gic
    assert "359 test images" in lines[-1]
