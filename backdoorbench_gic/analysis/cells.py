"""Finished matrix cells, each with its tidy row, its purified model and (shared across cells) its victim.

A cell folder under ``<output_root>/cells`` is finished once it holds ``result.json`` (written last, atomically).
Benchmarks that look inside the purified models (weight drift, BatchNorm re-estimation) walk the cells here,
as ``bbgic matrix report`` does for the rows, and load every victim's record once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..results import TIDY_ROW_FILE
from .keys import Col

DEFENSE_RESULT_FILE = "defense_result.pt"


@dataclass(frozen=True)
class FinishedCell:
    """One finished cell: its folder and its tidy row (``result.json``)."""

    cell_dir: Path
    row: dict[str, Any]

    @property
    def attack(self) -> str:
        return self.row[Col.ATTACK]

    @property
    def base_defense(self) -> str:
        """The purification defense (the one GIC wraps, for a calibrated cell)."""
        return self.row.get(Col.BASE_DEFENSE, self.row[Col.DEFENSE])

    @property
    def gic(self) -> bool:
        return bool(self.row.get(Col.GIC, False))

    @property
    def pair_key(self) -> tuple:
        """(attack, base defense, aux type, seed): what a calibrated cell and its uncalibrated partner share."""
        return self.attack, self.base_defense, self.row[Col.AUX_TYPE], self.row[Col.SEED]

    def purified_state(self, trust: bool = False) -> dict:
        """The purified network's state dict from ``defense_result.pt`` (the safe loader)."""
        from ..results import load_defense_result

        return load_defense_result(self.cell_dir / DEFENSE_RESULT_FILE, trust=trust)["model"]


def finished_cells(output_root: str | Path) -> Iterator[FinishedCell]:
    """Every finished cell under ``<output_root>/cells``, in path order; ``row['cell_dir']`` is the folder relative
    to ``output_root``."""
    output_root = Path(output_root)
    for path in sorted(Path(output_root, "cells").rglob(TIDY_ROW_FILE)):
        row = json.loads(path.read_text())
        row[Col.CELL_DIR] = str(path.parent.relative_to(output_root))
        yield FinishedCell(path.parent, row)


class Victims:
    """Attack records loaded once per name from a BackdoorBench root (with whatever per-record state a caller
    derives from them, via :meth:`derived`)."""

    def __init__(self, bb_root: str | Path | None):
        self.bb_root = bb_root
        self._records: dict[str, Any] = {}
        self._derived: dict[tuple[str, str], Any] = {}

    def record(self, name: str):
        if name not in self._records:
            from ..records import load_attack_record

            self._records[name] = load_attack_record(name, self.bb_root)
        return self._records[name]

    def derived(self, name: str, what: str, make):
        """``make(record)`` computed once per (record name, ``what``)."""
        if (name, what) not in self._derived:
            self._derived[name, what] = make(self.record(name))
        return self._derived[name, what]
