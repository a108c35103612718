"""The progress helper: whole lines (never a carriage return) off a terminal, tqdm on one, tqdm's interface."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from backdoorbench_gic.utils import progress as P
from backdoorbench_gic.utils.progress import LineProgress, format_seconds, progress_bar


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(P.time, "monotonic", c)
    monkeypatch.delenv("BBGIC_PROGRESS", raising=False)
    monkeypatch.delenv("BBGIC_PROGRESS_INTERVAL", raising=False)
    return c


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_format_seconds():
    assert format_seconds(0) == "0:00:00" and format_seconds(61.9) == "0:01:01" and format_seconds(3725) == "1:02:05"


def test_non_tty_prints_periodic_lines_and_no_carriage_return(clock):
    out = io.StringIO()
    bar = progress_bar(range(100), desc="fit", file=out)
    assert isinstance(bar, LineProgress) and bar.total == 100 and bar.interval == P.DEFAULT_INTERVAL
    seen = []
    for i in bar:
        seen.append(i)
        clock.t += 1.0  # one item a second: a line every 15 s
    assert seen == list(range(100))
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 100 // 15 + 1  # 6 periodic lines + the final one
    # after the 15th item, 15 s in: 15/100, 1 it/s, 85 s to go
    assert lines[0] == "[progress 0:00:15] fit 15/100 (15%) 1 it/s eta 0:01:25"
    assert lines[-1] == "fit: done 100/100 in 0:01:40"


def test_short_stage_prints_only_the_final_line_and_leave_false_nothing(clock):
    out = io.StringIO()
    for _ in progress_bar(range(5), desc="quick", file=out):
        clock.t += 0.1
    for _ in progress_bar(range(5), desc="inner", file=out, leave=False):
        clock.t += 0.1
    assert out.getvalue() == "quick: done 5/5 in 0:00:00\n"


def test_nested_bars_share_one_line_per_interval(clock):
    out = io.StringIO()
    with progress_bar(total=2, desc="ft", file=out) as outer:
        for epoch in range(2):
            for _ in progress_bar(range(20), desc=f"epoch {epoch}", file=out, leave=False):
                clock.t += 1.0
            outer.update()
            outer.set_postfix(acc="0.812")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[progress 0:00:15] ft 0/2 (0%) | epoch 0 15/20 (75%) 1 it/s eta 0:00:05"
    assert lines[1].startswith("[progress 0:00:30] ft 1/2 (50%) 30 s/it eta 0:00:30 [acc=0.812] | epoch 1 10/20")
    assert lines[-1] == "ft: done 2/2 in 0:00:40 (acc=0.812)" and len(lines) == 3


def test_manual_updates_unknown_total_and_interval_env(clock, monkeypatch):
    monkeypatch.setenv("BBGIC_PROGRESS_INTERVAL", "2")
    out = io.StringIO()
    bar = progress_bar(desc="cells", file=out, unit="cell")
    for _ in range(4):
        clock.t += 1.0
        bar.update()
    bar.close()
    bar.close()  # idempotent, like tqdm
    assert out.getvalue().splitlines() == ["[progress 0:00:02] cells 2 cell 1 cell/s", "[progress 0:00:04] cells 4 cell 1 cell/s",
                                           "cells: done 4 cell in 0:00:04"]


def test_disabled_counts_silently(clock):
    out = io.StringIO()
    bar = progress_bar(range(3), desc="x", file=out, disable=True)
    assert list(bar) == [0, 1, 2]
    bar.update(2)
    bar.set_postfix(a=1)
    bar.close()
    assert out.getvalue() == ""


def test_terminal_gets_tqdm_and_env_forces_lines(clock, monkeypatch):
    from tqdm.auto import tqdm

    tty = _Tty()
    bar = progress_bar(range(3), desc="x", file=tty)
    assert isinstance(bar, tqdm)
    list(bar)
    monkeypatch.setenv("BBGIC_PROGRESS", "lines")
    lines = progress_bar(range(3), file=tty)
    assert isinstance(lines, LineProgress)
    lines.close()
    monkeypatch.setenv("BBGIC_PROGRESS", "bar")
    assert isinstance(progress_bar(range(3), file=io.StringIO()), tqdm)


def test_redirected_process_output_has_no_carriage_returns(tmp_path):
    """End to end: a child process whose stderr is a file, as under `> log 2>&1`."""
    code = ("from backdoorbench_gic.utils.progress import progress_bar\n"
            "import time\n"
            "for _ in progress_bar(range(30), desc='work'):\n"
            "    time.sleep(0.01)\n")
    log = tmp_path / "log.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("BBGIC_NO_PROGRESS", "BBGIC_PROGRESS")}
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-c", code], stderr=fh, stdout=fh, check=True,
                       env={**env, "BBGIC_PROGRESS_INTERVAL": "0.05"})
    text = log.read_text()
    assert "\r" not in text and text.rstrip().splitlines()[-1].startswith("work: done 30/30 in ")
    assert len(text.splitlines()) >= 2  # periodic lines before the final one
