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
