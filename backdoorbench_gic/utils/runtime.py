"""Device, precision and seed handling in one place: CUDA when asked for and present, CPU otherwise, the
same code path for both."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when available; ``"cuda"`` without a GPU is an error, not a silent CPU run.

    BackdoorBench's comma lists (``cuda:0,1``) select their first device; we do not wrap in DataParallel.
    """
    if isinstance(device, torch.device):
        return device
    if device is None or str(device).lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = str(device).split(",")[0].strip()
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was requested but CUDA is not available on this machine; "
            "pass --device cpu (or 'auto') to run on the CPU"
        )
    return torch.device(dev)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on CPU (where bf16 conv is slower than fp32 on most machines)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to device; channels_last memory format for conv nets on CUDA."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        x = x.to(device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
    return x.to(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (CPU and CUDA); returns a CPU generator for data order and sampling."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g
