"""Atomic writes: every file we produce appears whole or not at all.

A result that a resumed run finds on disk must be trustworthy, so each writer goes through a temporary file
in the same directory, fsyncs it, and renames it over the target (rename is atomic on POSIX filesystems).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once at import, before any worker threads exist
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``.

    mkstemp creates the file 0600; the result gets the mode a plain ``open()`` would have given it (0666 minus
    the umask), so results stay readable by the group that shares a benchmark folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def update_json(target: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """Merge ``values`` into the JSON object stored at ``target`` (a new one if there is none) and write it
    atomically: keys other writers put there stay as they are, the given keys are replaced."""
    path = Path(target)
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: holds a JSON {type(stored).__name__}, not an object, so keys cannot be merged into it")
    return atomic_write_json(path, {**stored, **values})


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def atomic_write_with(target: str | os.PathLike, writer: Callable[[Path], None], suffix: str = "") -> Path:
    """Run ``writer(tmp_path)`` (e.g. a DataFrame's to_csv or torch.save) and move the result into place."""
    with atomic_path(target, suffix=suffix) as tmp:
        writer(tmp)
    return Path(target)


def atomic_torch_save(obj: Any, target: str | os.PathLike) -> Path:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(target, buf.getvalue())


def atomic_save_png(array, target: str | os.PathLike) -> Path:
    """Save an HxW or HxWxC uint8 array as a lossless PNG."""
    from PIL import Image
    import numpy as np

    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise TypeError(f"PNG export needs uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write_bytes(target, buf.getvalue())
