import subprocess
import sys

from backdoorbench_gic.cli import main


def test_list_prints_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for header in ("models:", "datasets:", "attacks:", "defenses:", "aux_sources:"):
        assert header in out
    assert "preactresnet18" in out and "fashion-mnist" in out


def test_inspect_exit_codes(bb_record, tmp_path, capsys):
    root, record_dir = bb_record
    assert main(["inspect", str(record_dir)]) == 0
    assert "VALID" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "INVALID" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "backdoorbench_gic.cli", "list", "model"], capture_output=True, text=True)
    assert out.returncode == 0 and "preactresnet18" in out.stdout


# -- a CLI that starts fast and documents itself (issue 18) ---------------------------------------------------------
import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

from backdoorbench_gic.cli import build_parser  # noqa: E402


def _torch_after(code: str, cache_dir) -> tuple[bool, str]:
    """Run ``code`` in a fresh interpreter; whether torch got imported, and what it printed."""
    probe = (f"import sys\nfrom backdoorbench_gic.cli import main\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    env = {**os.environ, "BBGIC_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().endswith("\nTORCH") or out.stdout.strip() == "TORCH", out.stdout


def test_help_does_not_import_torch(tmp_path):
    imported, out = _torch_after("main(['--help'])", tmp_path)
    assert not imported and "attack" in out and "demo" in out and "defend" in out


def test_list_answers_from_its_cache_without_torch(tmp_path):
    first_torch, first = _torch_after("main(['list'])", tmp_path)
    assert first_torch  # nothing cached yet: the registries are imported
    for _ in range(3):  # a source file edited between the two calls changes the key; then the next pair decides
        again_torch, again = _torch_after("main(['list'])", tmp_path)
        if not again_torch:
            break
    assert not again_torch and again.replace("NO-TORCH", "") == first.replace("TORCH", "")
    cached = list((tmp_path / "catalog").glob("*.json"))
    assert len(cached) == 1 and "defense" in json.loads(cached[0].read_text())


def test_list_cache_follows_its_key(tmp_path, monkeypatch, capsys):
    from backdoorbench_gic.commands import listing

    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(listing, "catalog_key", lambda: "k1")
    assert main(["list", "defense"]) == 0
    (tmp_path / "catalog" / "k1.json").write_text(json.dumps({r.kind: f"{r.kind}: STALE" for r in listing._registries()}))
    assert main(["list", "defense"]) == 0
    assert capsys.readouterr().out.endswith("defense: STALE\n")  # the cache answered
    monkeypatch.setattr(listing, "catalog_key", lambda: "k2")  # a source file changed
    assert main(["list", "defense"]) == 0
    assert "STALE" not in capsys.readouterr().out and "ft" in listing.catalog()["defense"]
    assert [p.name for p in (tmp_path / "catalog").glob("*.json")] == ["k2.json"]


def test_list_name_shows_every_config_key_with_its_default(capsys):
    from backdoorbench_gic.commands.listing import describe
    from backdoorbench_gic.registry import ATTACKS, DEFENSES

    for reg in (DEFENSES, ATTACKS):
        for name in reg.names():
            cls = reg.get(name).config_class
            text = describe(name, kinds=(reg.kind,))
            for f in dataclasses.fields(cls):
                if f.init and not f.name.startswith("_"):
                    assert f"\n  {f.name} " in text, (name, f.name)
    text = describe("ft")
    own = text.split("common BackdoorBench keys")[0]
    assert "epochs" in own and "100" in own and "lr_scheduler" not in own  # ft changes only the epoch count
    assert main(["list", "defense", "ft", "--dataset", "fashion-mnist"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist.yaml" in out and "packaged yaml for fashion-mnist" in out
    assert main(["list", "model", "preactresnet18"]) == 0 and "(no config keys)" in capsys.readouterr().out
    assert main(["list", "nosuchthing"]) == 2
    assert "no component called 'nosuchthing'" in capsys.readouterr().err


def test_defend_help_lists_the_defense_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["defend", "--defense", "sau", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--result_file" in out and "config keys of SAUConfig" in out and "adv_steps" in out
    with pytest.raises(SystemExit):
        main(["defend", "--help"])
    assert "put --defense NAME before --help" in capsys.readouterr().out


def _all_parsers():
    top = build_parser(None)
    names = list(next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices)
    for name in names:
        sub = next(a for a in build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
        stack = [([name], sub.choices[name])]
        while stack:
            path, p = stack.pop()
            yield path, p
            for a in p._actions:
                if isinstance(a, argparse._SubParsersAction):
                    stack += [(path + [n], sp) for n, sp in a.choices.items()]


def test_every_flag_has_help_and_one_device_default():
    seen = set()
    for path, p in _all_parsers():
        seen.add(path[0])
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            assert a.help, f"bbgic {' '.join(path)} {a.option_strings or a.dest} has no help text"
            if "--device" in a.option_strings:
                assert a.default in ("auto", None) and "auto" in a.help, path
            for flag in a.option_strings:
                if flag.startswith("--") and "-" in flag[2:]:  # a hyphenated spelling is only an alias
                    assert f"--{flag[2:].replace('-', '_')}" in a.option_strings, (path, flag)
    assert {"attack", "defend", "demo", "list", "matrix", "patch"} <= seen


def test_hyphenated_flags_stay_aliases():
    for argv in (["matrix", "run", "s.yaml", "--ray_address", "auto"], ["matrix", "run", "s.yaml", "--ray-address", "auto"]):
        assert build_parser("matrix").parse_args(argv).ray_address == "auto"
    for flag in ("--write_patch", "--write-patch"):
        assert build_parser("patch").parse_args(["patch", flag, "x.patch"]).write_patch == "x.patch"


def test_demo_command_runs_the_embedded_demo(monkeypatch, tmp_path):
    from backdoorbench_gic import demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: calls.append((a, k)) or [])
    assert main(["demo", "--bb_root", str(tmp_path), "--no_gic"]) == 0
    assert calls == [(("digits", str(tmp_path), "auto"), {"gic": False, "shift": None})]
    calls.clear()
    assert demo.main(["--dataset", "fashion-mnist", "--device", "cpu", "--shift", "reserved_blur"]) == 0
    assert calls == [(("fashion-mnist", "bbgic_demo", "cpu"), {"gic": True, "shift": "reserved_blur"})]
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: (_ for _ in ()).throw(ValueError("no such dataset")))
    assert main(["demo", "--dataset", "nope"]) == 2


def test_demo_table_is_in_percent_with_a_reading(capsys):
    from backdoorbench_gic.demo import LEGEND, reading, render_table

    table = render_table([{"defense": "ft", "aux": "reserved", "n": 224, "C-Acc": 0.9777, "ASR": 0.3684, "RA": 0.6223,
                           "DER": 0.793}], "title")
    assert table.splitlines()[-1].split() == ["ft", "reserved", "224", "97.77", "36.84", "62.23", "79.30"]
    assert "50 % = no change" in LEGEND
    rows = [{"defense": "ft", "aux_type": "noise", "der": 0.70, "acc_before": 0.98, "acc_after": 0.97,
             "asr_before": 0.96, "asr_after": 0.40, "eval_n_clean": 360},
            {"defense": "gic-ft", "aux_type": "noise", "der": 0.75, "acc_before": 0.98, "acc_after": 0.97,
             "asr_before": 0.96, "asr_after": 0.30, "eval_n_clean": 360}]
    text = reading(rows)  # one line per row by the success rule (tests/test_newcomer.py has the details)
    assert "gic-ft on noise: failure (ASR 30.0% > 10 %): ASR 96.0% -> 30.0%" in text and "360 test images" in text


def test_defend_prints_the_gic_summary_from_the_row():
    from backdoorbench_gic.commands.defend import format_gic_summary, format_row

    row = {"defense": "gic-ft", "attack": "a", "aux_type": "reserved", "aux_size": 10, "acc_before": 0.9,
           "acc_after": 0.85, "asr_before": 1.0, "asr_after": 0.1, "ra_before": 0.0, "ra_after": 0.8, "der": 0.925,
           "rir": 0.875, "wall_seconds": 1.0, "device": "cpu", "extra_gic_delta": 16 / 255,
           "extra_bn_div_before": 0.5, "extra_bn_div_after": 0.125, "extra_drift_class": 3,
           "extra_drift_share": 0.25, "extra_drift_flag": 1.0}
    assert "C-Acc 90.00% -> 85.00%" in format_row(row) and "DER 92.50%" in format_row(row)
    assert format_gic_summary(row) == ("GIC: delta 16.0/255, D_BN 0.5000 -> 0.1250, drift: on g(aux) the victim "
                                       "predicts class 3 (the class that gained most) for 25.0% of the images: "
                                       "WARNING, predictions concentrate on it, as on a backdoor's target")
    row.update(extra_drift_ratio=2.5, extra_drift_raw_share=0.12)
    assert "25.0% of the images, against 10.0% of the labels and 12.0% before calibration" in format_gic_summary(row)
    assert "WARNING" not in format_gic_summary({**row, "extra_drift_flag": 0.0})
    assert format_gic_summary({k: v for k, v in row.items() if not k.startswith("extra_")}) is None
