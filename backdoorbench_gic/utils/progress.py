"""Progress for long stages: a tqdm bar on a terminal, periodic one-line updates everywhere else.

``progress_bar`` takes tqdm's arguments (``iterable``, ``total``, ``desc``, ``leave``, ``disable``, ``unit``) and
methods (iteration, ``update``, ``set_postfix``, ``set_postfix_str``, ``set_description``, ``close``, ``with``), so a
call site swaps ``tqdm(...)`` for ``progress_bar(...)`` and nothing else.

When the stream (stderr by default) is not a terminal (a log file, CI, ``> file``, a pipe), tqdm's carriage-return
redraws would write every refresh into the file (a split wrote thousands). There the bar prints one whole line,
at most every ``interval`` seconds (``BBGIC_PROGRESS_INTERVAL``, default 15) for all open bars together,
innermost last::

    [progress 0:00:30] ft 3/10 (30%) | ft epoch 3 120/400 (30%) 41.2 it/s eta 0:00:07

and, for a bar created with ``leave=True``, a final ``done`` line (``ft: done 10/10 in 0:01:40``). Nothing is
printed for a stage shorter than the interval except that final line. ``BBGIC_PROGRESS=lines`` or ``=bar``
forces either mode; ``BBGIC_NO_PROGRESS=1`` (or ``disable=True``) turns progress off.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Any, Iterable, Iterator

DEFAULT_INTERVAL = 15.0
_lock = threading.Lock()
_open: list["LineProgress"] = []  # open line-mode bars, outermost first
_last_print = [0.0]  # shared across bars: one line per interval whatever the nesting


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("BBGIC_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def format_seconds(s: float) -> str:
    """``h:mm:ss`` (as tqdm prints elapsed time)."""
    s = int(max(0.0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def is_terminal(stream: IO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or unusual streams
        return False


class LineProgress:
    """tqdm's interface, printing whole lines (no ``\\r``) at most every ``interval`` seconds."""

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None, total: float | None = None,
                 leave: bool = True, file: IO | None = None, unit: str = "it", interval: float | None = None,
                 initial: float = 0, **_ignored: Any):
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.total = total
        self.desc = desc or ""
        self.leave = leave
        self.file = file
        self.unit = unit
        self.interval = _interval() if interval is None else interval
        self.n = initial
        self.postfix = ""
        self.start = time.monotonic()
        self.closed = False
        with _lock:
            _open.append(self)
            if len(_open) == 1:
                _last_print[0] = self.start  # the first line comes one interval after the outermost stage began

    # -- tqdm's interface ------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress bar wraps no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        self._maybe_print()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, s: str) -> None:
        self._emit(s)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with _lock:
            if self in _open:
                _open.remove(self)
        if self.leave:
            done = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g} {self.unit}"
            self._emit(f"{self.desc or 'progress'}: done {done} in {format_seconds(time.monotonic() - self.start)}"
                       + (f" ({self.postfix})" if self.postfix else ""))

    # -- lines -------------------------------------------------------------------------------------------------------
    def status(self, now: float | None = None) -> str:
        """This bar's part of a line: ``desc n/total (pct%) rate eta [postfix]``."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{self.n:g}/{self.total:g} ({100.0 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n:g} {self.unit}")
        if elapsed > 0 and self.n > 0:
            rate = self.n / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
            if self.total and self.n < self.total:
                parts.append(f"eta {format_seconds((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(f"[{self.postfix}]")
        return " ".join(parts)

    def _maybe_print(self) -> None:
        now = time.monotonic()
        with _lock:
            if now - _last_print[0] < self.interval or self not in _open:
                return
            _last_print[0] = now
            outer = _open[0].start
            line = f"[progress {format_seconds(now - outer)}] " + " | ".join(b.status(now) for b in _open)
        self._emit(line)

    def _emit(self, line: str) -> None:
        f = self.file if self.file is not None else sys.stderr
        try:
            f.write(line.replace("\r", " ").rstrip("\n") + "\n")
            f.flush()
        except (ValueError, OSError):  # a closed stream must not kill the work
            pass


class _Disabled(LineProgress):
    """``disable=True``: iterates and counts, prints nothing."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, **kwargs: Any):
        self.iterable, self.total, self.n, self.closed, self.postfix = iterable, total, 0, False, ""

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress bar wraps no iterable")
        return iter(self.iterable)

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True

    def write(self, s: str) -> None:
        pass


def line_mode(file: IO | None = None) -> bool:
    """Whether progress on ``file`` (default stderr) prints lines instead of a redrawn bar."""
    forced = os.environ.get("BBGIC_PROGRESS", "").strip().lower()
    if forced in ("lines", "line"):
        return True
    if forced in ("bar", "tqdm"):
        return False
    return not is_terminal(file if file is not None else sys.stderr)


def progress_bar(iterable: Iterable | None = None, desc: str | None = None, total: float | None = None,
                 leave: bool = True, disable: bool | None = False, file: IO | None = None, unit: str = "it",
                 **kwargs: Any):
    """A drop-in for ``tqdm(...)``: tqdm on a terminal, :class:`LineProgress` otherwise (see the module docstring).

    ``disable=None`` follows :func:`backdoorbench_gic.utils.logs.progress_enabled` (``BBGIC_NO_PROGRESS``)."""
    if disable is None:
        from .logs import progress_enabled

        disable = not progress_enabled(None)
    if disable:
        return _Disabled(iterable, total=total)
    if line_mode(file):
        return LineProgress(iterable, desc=desc, total=total, leave=leave, file=file, unit=unit, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, file=file, unit=unit, **kwargs)
