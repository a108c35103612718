"""Run logs in BackdoorBench's place (``<folder>/log/<timestamp>.log``) without touching the root logger.

Handlers are attached to the package logger for the duration of a run and removed afterwards, so running
many defenses in one process never duplicates lines.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

PACKAGE_LOGGER = "backdoorbench_gic"
_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"


def timestamp() -> str:
    return time.strftime("%Y_%m_%d_%H_%M_%S")


def progress_enabled(progress: bool | None = None) -> bool:
    """Progress on unless turned off (the argument, or ``BBGIC_NO_PROGRESS=1``). Off a terminal (CI, a log file)
    :func:`backdoorbench_gic.utils.progress.progress_bar` prints periodic whole lines instead of a redrawn bar."""
    if progress is not None:
        return progress
    return not os.environ.get("BBGIC_NO_PROGRESS")


def console_logging(level: int = logging.INFO) -> None:
    """Used by the CLI entry points only: print package INFO lines to stderr once."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = next((h for h in logger.handlers if getattr(h, "_bbgic_console", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._bbgic_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    handler.setLevel(level)  # run logs lower the logger's level to DEBUG for their file; the console keeps its own
    logger.setLevel(min(level, logger.level) if logger.level else level)


@contextlib.contextmanager
def run_log(log_dir: str | os.PathLike, name: str | None = None, level: int = logging.DEBUG) -> Iterator[Path]:
    """Write package log lines to ``log_dir/<timestamp>.log`` while the block runs."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name or timestamp()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(level)
    logger = logging.getLogger(PACKAGE_LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
