"""Where the packaged data folders are, in a checkout (editable install) and in an installed wheel."""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    inside = _PKG / name  # installed wheel: setup.py maps the top-level folder into the package
    if inside.is_dir():
        return inside
    return _PKG.parent / name  # checkout / editable install: the folder sits beside the package


def defense_configs_dir() -> Path:
    return _find("defense_configs")


def patches_dir() -> Path:
    return _find("patches")
