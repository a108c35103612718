"""Install GIC into a BackdoorBench (or BackdoorBenchER) checkout by adding new files only.

``bbgic patch <checkout>`` copies ``patches/backdoorbench/**`` (``defense/gic.py`` and
``config/defense/gic/*.yaml``) into the checkout and records what it wrote, with hashes, in
``<checkout>/.bbgic_patch.json``. It refuses to overwrite a file it did not write (unless ``--force``),
``--check`` verifies the installed copy, and ``--remove`` deletes exactly the files it wrote (unchanged ones;
edited ones only with ``--force``) and the folders it created, leaving the checkout as it was. Their files
(CC BY-NC / GPL) are never touched or shipped. :func:`unified_patch` renders the same files as a
``git apply``-able patch of new files.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .resources import patches_dir
from .utils.io import atomic_write_bytes, atomic_write_json

MANIFEST = ".bbgic_patch.json"
# files whose presence identifies a checkout (relative to its root)
MARKERS = ("attack", "defense", "config/defense", "utils/save_load_attack.py")
ER_MARKERS = ("defense/fst.py",)


class CheckoutError(ValueError):
    """The target is not a BackdoorBench checkout, or installing/removing would touch files we do not own."""


@dataclass
class PatchReport:
    flavour: str
    installed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def source_root() -> Path:
    root = patches_dir() / "backdoorbench"
    if not root.is_dir():
        raise FileNotFoundError(f"the patch files are missing from this installation ({root})")
    return root


def patch_files() -> dict[str, bytes]:
    """Relative path -> content of every file the patch adds."""
    root = source_root()
    return {str(p.relative_to(root)).replace(os.sep, "/"): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _mode(rel: str) -> int:
    """The permissions a file gets, here and in the git patch: scripts executable, the rest plain."""
    return 0o755 if rel.endswith(".py") else 0o644


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def detect_checkout(path: str | os.PathLike) -> str:
    """'BackdoorBench' or 'BackdoorBenchER'; raises naming every missing marker otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise CheckoutError(f"{root} is not a directory")
    missing = [m for m in MARKERS if not (root / m).exists()]
    if missing:
        raise CheckoutError(f"{root} does not look like a BackdoorBench checkout: missing {', '.join(missing)} "
                            f"(expected all of {', '.join(MARKERS)})")
    return "BackdoorBenchER" if all((root / m).exists() for m in ER_MARKERS) else "BackdoorBench"


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        return {"files": {}, "dirs": []}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise CheckoutError(f"{path} is not valid JSON; fix or delete it") from None


def install(path: str | os.PathLike, force: bool = False) -> PatchReport:
    root = Path(path)
    report = PatchReport(detect_checkout(root))
    manifest = _read_manifest(root)
    owned: dict[str, str] = manifest.get("files", {})
    files = patch_files()
    for rel in files:
        target = root / rel
        if target.exists() and rel not in owned and not force:
            raise CheckoutError(f"{target} exists and was not written by bbgic patch; pass --force to overwrite it")
        if (rel in owned and target.is_file() and _sha(target.read_bytes()) not in (owned[rel], _sha(files[rel]))
                and not force):
            raise CheckoutError(f"{target} was modified after installation; pass --force to overwrite it")
    created_dirs = set(manifest.get("dirs", []))
    for rel, data in files.items():
        target = root / rel
        for parent in reversed(Path(rel).parents[:-1]):
            if not (root / parent).exists():
                created_dirs.add(str(parent).replace(os.sep, "/"))
        if target.exists() and target.read_bytes() == data:
            report.skipped.append(rel)
        else:
            atomic_write_bytes(target, data)
            target.chmod(_mode(rel))  # the atomic writer's temporary file is private (0600)
            report.installed.append(rel)
        owned[rel] = _sha(data)
    atomic_write_json(root / MANIFEST, {"tool": "backdoorbench-gic", "version": __version__, "files": owned,
                                        "dirs": sorted(created_dirs)})
    return report


def check(path: str | os.PathLike) -> PatchReport:
    root = Path(path)
    report = PatchReport(detect_checkout(root))
    manifest = _read_manifest(root)
    if not manifest.get("files"):
        report.problems.append(f"no GIC installation found (no {MANIFEST}); run `bbgic patch {root}`")
        return report
    current = patch_files()
    for rel, digest in manifest["files"].items():
        target = root / rel
        if not target.is_file():
            report.problems.append(f"{rel} is missing")
        elif _sha(target.read_bytes()) != digest:
            report.problems.append(f"{rel} was modified after installation")
        elif rel in current and _sha(current[rel]) != digest:
            report.problems.append(f"{rel} is from backdoorbench-gic {manifest.get('version')}; run `bbgic patch` again "
                                   f"to update it to {__version__}")
        else:
            report.installed.append(rel)
    for rel in current:
        if rel not in manifest["files"]:
            report.problems.append(f"{rel} is not installed (new in {__version__}); run `bbgic patch` again")
    return report


def remove(path: str | os.PathLike, force: bool = False) -> PatchReport:
    root = Path(path)
    report = PatchReport(detect_checkout(root))
    manifest = _read_manifest(root)
    if not manifest.get("files"):
        raise CheckoutError(f"nothing to remove: {root / MANIFEST} does not exist")
    for rel, digest in manifest["files"].items():
        target = root / rel
        if target.is_file() and _sha(target.read_bytes()) != digest and not force:
            raise CheckoutError(f"{target} was modified after installation; pass --force to remove it anyway")
    for rel in manifest["files"]:
        target = root / rel
        if target.is_file():
            target.unlink()
            report.installed.append(rel)
        cache = target.parent / "__pycache__"
        if cache.is_dir():
            stem = Path(rel).stem
            for c in cache.glob(f"{stem}.*.pyc"):
                c.unlink()
            if not any(cache.iterdir()):
                cache.rmdir()
    for rel in sorted(manifest.get("dirs", []), key=lambda d: -d.count("/")):
        d = root / rel
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    (root / MANIFEST).unlink()
    return report


def unified_patch() -> str:
    """The patch files as a git-style diff that only adds files (``git apply`` in the checkout root)."""
    chunks = []
    for rel, data in patch_files().items():
        text = data.decode("utf-8")
        # split on "\n" only: str.splitlines also breaks at form feeds and other separators, which git does not
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        mode = f"100{_mode(rel):o}"
        chunks.append(f"diff --git a/{rel} b/{rel}\nnew file mode {mode}\n--- /dev/null\n+++ b/{rel}\n"
                      f"@@ -0,0 +1,{len(lines)} @@\n" + "".join(f"+{line}\n" for line in lines)
                      + ("" if text.endswith("\n") else "\\ No newline at end of file\n"))
    return "".join(chunks)


def patch_file_path() -> Path:
    return patches_dir() / "backdoorbench-gic.patch"


def write_patch_file(target: Path | None = None) -> Path:
    target = target or patch_file_path()
    atomic_write_bytes(target, unified_patch().encode("utf-8"))
    target.chmod(0o644)
    return target
