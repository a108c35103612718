"""Loading ``.pt`` files that are pickles we did not write, and putting their state dicts into our networks.

A BackdoorBench ``attack_result.pt`` holds numpy arrays and numpy integer keys, which torch >= 2.6 refuses
to unpickle by default. We never fall back to a full unpickle silently: the file's pickle globals are listed
statically first (nothing runs), and only the six numpy globals such records contain (formats doc sections 9
and 11, both numpy 1.x and 2.x spellings) are allowed through ``torch.load(weights_only=True)``. Anything
else is refused with the offending names unless the caller passes ``trust=True`` (``--trust_checkpoint``).
"""
from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint needs pickle globals outside the allow-list."""

    def __init__(self, path: str | os.PathLike, globals_: list[str]):
        self.path = str(path)
        self.globals = list(globals_)
        super().__init__(
            f"refusing to load {self.path}: it needs the pickle global(s) {', '.join(self.globals)}, which are not "
            "among the numpy types a BackdoorBench record contains. A pickle can run code while it loads. If you "
            "made this file or trust its source, pass --trust_checkpoint (trust=True) to load it anyway."
        )


class StateDictMismatchError(RuntimeError):
    def __init__(self, missing: list[str], unexpected: list[str], shape: list[str], where: str = ""):
        self.missing, self.unexpected, self.shape = missing, unexpected, shape
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        if shape:
            parts.append(f"shape mismatches: {', '.join(shape[:20])}")
        super().__init__(f"state dict does not fit the network{(' ' + where) if where else ''}: " + "; ".join(parts))


def _numpy_allowlist() -> list[Any]:
    """The numpy globals of a BackdoorBench record, registered under both numpy 1.x and 2.x module names."""
    try:
        from numpy._core import multiarray as ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma  # type: ignore[no-redef]
    reconstruct, scalar = ma._reconstruct, ma.scalar
    f64 = type(np.dtype(np.float64))
    i64 = type(np.dtype(np.int64))
    entries: list[Any] = [np.ndarray, np.dtype, f64, i64]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        entries.append((reconstruct, f"{module}._reconstruct"))
        entries.append((scalar, f"{module}.scalar"))
    # dtype classes under their public names (numpy 2 pickles them as numpy.dtypes.*)
    entries.append((f64, "numpy.dtypes.Float64DType"))
    entries.append((i64, "numpy.dtypes.Int64DType"))
    return entries


ALLOWED_GLOBAL_NAMES = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
    "numpy.ndarray", "numpy.dtype", "numpy.dtypes.Float64DType", "numpy.dtypes.Int64DType",
})


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """Pickle globals in ``path`` beyond torch's own safe set and our numpy allow-list (static scan, runs nothing)."""
    found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return sorted(g for g in found if g not in ALLOWED_GLOBAL_NAMES)


def safe_torch_load(path: str | os.PathLike, trust: bool = False) -> Any:
    """Load a ``.pt`` file on the CPU; refuse anything beyond the allow-list unless ``trust``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if trust:
        log.warning("loading %s with weights_only=False because --trust_checkpoint was given: "
                    "the pickle may run code", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    return load_allowlisted(path)


def load_allowlisted(f: Any, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with the numpy allow-list; never a full unpickle.

    ``f`` is a path (its globals are listed statically first, so a refusal names them) or an open binary file;
    ``map_location`` is passed on as torch.load takes it. Anything outside the allow-list raises
    :class:`UntrustedCheckpointError` before any of the pickle's code could run."""
    name = str(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", repr(f))
    if isinstance(f, (str, os.PathLike)):
        if not Path(f).is_file():
            raise FileNotFoundError(f"no such file: {f}")
        try:
            bad = unsafe_globals(f)
        except Exception as exc:  # not a zip/pickle torch understands
            raise unreadable(name, exc) from None
        if bad:
            raise UntrustedCheckpointError(name, bad)
    with torch.serialization.safe_globals(_numpy_allowlist()):
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except Exception as exc:
            # a global the static scan could not see (pushed dynamically): still refused, never executed
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            if found is None and "Weights only load failed" not in str(exc):
                raise unreadable(name, exc) from None  # damaged bytes, not a refused global
            raise UntrustedCheckpointError(name, [found.group(1) if found else str(exc).splitlines()[0][:200]]) from None


def unreadable(name: str, exc: Exception) -> ValueError:
    """A file torch cannot read as a checkpoint (truncated by an interrupted copy, damaged): what to do, and
    torch's own reason in one sentence (its zip reader's is followed by a paragraph on miniz)."""
    reason = re.split(r"(?<=\.)\s", str(exc).strip(), maxsplit=1)[0].rstrip(".") or type(exc).__name__
    return ValueError(f"{name} is not a readable torch checkpoint: it is truncated or damaged ({reason}); re-copy or "
                      "re-create the record")


# ---------------------------------------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------------------------------------
def normalize_state_dict(state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Strip DataParallel's ``module.`` prefix and fold FP-style ``weight_orig * weight_mask`` pruning pairs."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        key = k[len("module."):] if k.startswith("module.") else k
        out[key] = v
    for k in [k for k in out if k.endswith("_orig")]:
        base = k[: -len("_orig")]
        mask_key = base + "_mask"
        if mask_key in out:
            out[base] = out.pop(k) * out.pop(mask_key)
    return out


def load_state_dict_strict(net: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str = "") -> None:
    """Load by name after :func:`normalize_state_dict`; any missing, unexpected or mis-shaped key is an error
    naming it (BackdoorBench renames keys by position, which hides such problems)."""
    state = normalize_state_dict(state)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        raise StateDictMismatchError(missing, unexpected, shape, where)
    net.load_state_dict(state, strict=True)
