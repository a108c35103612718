"""The README's Python quickstart runs as printed, on a generated BackdoorBenchER-style record named as in the text."""
from __future__ import annotations

import re
from pathlib import Path


import backdoorbench_gic

README = Path(backdoorbench_gic.__file__).resolve().parent.parent / "README.md"


def python_quickstart() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("### The same from Python", 1)
    assert len(section) == 2, "README.md lost its '### The same from Python' section"
    block = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert block, "no ```python block in the README's Python quickstart"
    return block.group(1)


def test_snippet_covers_the_whole_flow():
    code = python_quickstart()
    for step in ("load_attack_record(", "build_aux_set(", ".fit(", ".transform(", ".purify(", "evaluate("):
        assert step in code, step
    assert len([line for line in code.splitlines() if line.strip()]) <= 22



def test_readme_python_quickstart_runs(tmp_path, monkeypatch, capsys, one_thread):
    from backdoorbench_gic.testing import make_split_record

    monkeypatch.setenv("BBGIC_CACHE_DIR", str(tmp_path / "cache"))
    # 300 train / 100 reserved images: 20 % of |train| is 60, six reserved images per class (BackdoorBenchER's rule)
    make_split_record(tmp_path / "bbgic_demo", "demo_digits_badnet", n_train=400, n_test=60, split_ratio=0.25,
                      train_steps=30, width=8)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(python_quickstart(), str(README), "exec"), {"__name__": "readme_quickstart"})
    out = capsys.readouterr().out
    rows = re.findall(r"^(victim|FST on g\(aux\)): C-Acc (\d+\.\d%)  ASR (\d+\.\d%)  RA (\d+\.\d%)$", out, re.M)
    assert [r[0] for r in rows] == ["victim", "FST on g(aux)"], out  # in percent, as the README promises
    assert re.search(r"^GIC: delta .*, D_BN \d\.\d{4} -> \d\.\d{4}", out, re.M), out
