"""The installation itself: torch and torchvision from different builds.

torchvision ships compiled operators built against one torch build. Installed from another index than torch (torch's
CPU wheel and torchvision's default CUDA wheel from PyPI, or two CUDA versions), ``import torchvision`` fails with
``operator torchvision::nms does not exist`` (or torchvision's own "Couldn't load custom C++ ops"). Nothing about a
record or a dataset is wrong then, and the fix is one pip command, so the failure is recognised here, reported
once, as what it is, with that command (:class:`TorchBuildMismatch`), and never as a bad record.

:func:`check_torch_build` runs at start-up (``bbgic``, ``run_defense.py``). It reads the two packages' versions
from their metadata (milliseconds) and imports torchvision only when they disagree (a different local build tag,
``+cpu`` against none or ``+cu130``, or a torchvision release that does not pair with torch), so a sound install
pays nothing; a mismatch the versions do not show is still recognised where the import fails
(:func:`as_build_mismatch`, used by the CLI's error handler and by ``bbgic inspect``).
"""
from __future__ import annotations

import re
from importlib import metadata

SIGNATURES = (re.compile(r"operator torchvision::\w+ does not exist"), re.compile(r"Couldn't load custom C\+\+ ops"))
PYTORCH_INDEX = "https://download.pytorch.org/whl"


class TorchBuildMismatch(RuntimeError):
    """torch and torchvision come from different builds; the message carries the reinstall command."""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _split(version: str) -> tuple[str, str]:
    """``"2.14.1+cpu"`` -> ``("2.14.1", "cpu")``; no local tag -> ``(version, "")``."""
    public, _, local = version.partition("+")
    return public, local


def paired_torchvision(torch_version: str) -> str | None:
    """The torchvision minor series released with a torch 2.x (torch 2.m pairs with torchvision 0.(m+15)), as a
    pip pattern such as ``0.29.*``; None for versions the rule does not cover."""
    m = re.match(r"2\.(\d+)\.", _split(torch_version)[0] + ".")
    return f"0.{int(m.group(1)) + 15}.*" if m else None


def versions_disagree(torch_version: str, vision_version: str) -> bool:
    """Whether the metadata alone says the two builds may not fit: different local tags, or a torchvision release
    outside the series paired with torch."""
    if _split(torch_version)[1] != _split(vision_version)[1]:
        return True
    paired = paired_torchvision(torch_version)
    return paired is not None and not _split(vision_version)[0].startswith(paired[:-1])


def reinstall_command(torch_version: str, vision_version: str | None) -> str:
    """One pip command that puts both packages back from torch's own index: torch's exact build, and torchvision
    from the same index (the installed release when it pairs with torch, else the paired series)."""
    public, tag = _split(torch_version)
    vision = _split(vision_version)[0] if vision_version else None
    paired = paired_torchvision(torch_version)
    if vision is None or (paired is not None and not vision.startswith(paired[:-1])):
        vision_pin = f"torchvision=={paired}" if paired else "torchvision"
    else:
        vision_pin = f"torchvision=={vision}{'+' + tag if tag else ''}"
    index = f" --index-url {PYTORCH_INDEX}/{tag}" if tag else ""
    return (f"python -m pip install --force-reinstall --no-deps torch=={public}{'+' + tag if tag else ''} "
            f"{vision_pin}{index}")


def _is_mismatch(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 8:  # the import error may be wrapped (raise ... from exc)
        if any(sig.search(str(exc)) for sig in SIGNATURES):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def as_build_mismatch(exc: BaseException) -> TorchBuildMismatch | None:
    """``exc`` (or what it wraps) as a :class:`TorchBuildMismatch` when it is torchvision's operator failure;
    None otherwise."""
    if isinstance(exc, TorchBuildMismatch):
        return exc
    if not _is_mismatch(exc):
        return None
    torch_version, vision_version = _version("torch") or "?", _version("torchvision")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TorchBuildMismatch(
        f"torch {torch_version} and torchvision {vision_version or '?'} come from different builds: torchvision's "
        f"compiled operators do not load against this torch ({first}). This is the installation, not your record or "
        "data. Reinstall both from the same index:\n    " + reinstall_command(torch_version, vision_version))


def _import_torchvision() -> None:
    import torchvision  # noqa: F401


_CHECKED: list[TorchBuildMismatch | None] = []  # the start-up check's result, once per process


def check_torch_build() -> None:
    """Raise :class:`TorchBuildMismatch` when torch and torchvision come from different builds. The check runs
    once per process (later calls repeat its result) and imports torchvision only when the installed versions
    disagree; an import failure of another kind is left to the code that needs torchvision."""
    if not _CHECKED:
        _CHECKED.append(_find_mismatch())
    if _CHECKED[0] is not None:
        raise _CHECKED[0]


def _find_mismatch() -> TorchBuildMismatch | None:
    torch_version, vision_version = _version("torch"), _version("torchvision")
    if torch_version is None or vision_version is None or not versions_disagree(torch_version, vision_version):
        return None
    try:
        _import_torchvision()
    except Exception as exc:  # noqa: BLE001 - only the build mismatch is reported here
        return as_build_mismatch(exc)
    return None
