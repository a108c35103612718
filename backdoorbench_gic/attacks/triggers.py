"""Trigger functions, re-implemented from the attack papers, on whole batches of images.

Everything here is pure and batch-wise: ``uint8`` N x C x H x W in, ``uint8`` N x C x H x W out (the poisoned
PNGs of a record are 8-bit, so the victim is evaluated on exactly the pixels a loader reads back), except the
WaNet warp, which also runs on float batches in [0,1] during training.

- BadNets (Gu et al. 2017): a patch replaces the pixels where the trigger mask is non-zero. BackdoorBench's
  default mask is a 32x32 black image with a 3x3 white square at rows/columns 29-31; other sizes get that mask
  resized (nearest neighbour, so the square stays crisp and white).
- Blended (Chen et al. 2017): ``(1 - alpha) * x + alpha * trigger``.
- SIG (Barni et al. 2019): ``x + delta * sin(2 * pi * j * f / W)`` at column ``j``, clipped to [0, 255].
- WaNet (Nguyen & Tran 2021): a fixed smooth warping field from a random k x k control grid, upsampled.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BADNET_BASE = 32  # BackdoorBench's trigger image is 32x32
BADNET_SQUARE = 3  # a 3x3 white square in its bottom-right corner (rows and columns 29-31)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round float pixel values on the 0-255 scale to the nearest 8-bit level."""
    return x.round().clamp_(0, 255).to(torch.uint8)


def load_image(path: str | Path, height: int, width: int, channels: int, nearest: bool = False) -> torch.Tensor:
    """An image file as a uint8 C x H x W tensor, converted to the dataset's channels and size."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.NEAREST if nearest else Image.BILINEAR)
        arr = np.array(img, dtype=np.uint8).reshape(height, width, channels)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------
# BadNets
# ---------------------------------------------------------------------------------------------------------
def badnet_mask(height: int, width: int, channels: int) -> torch.Tensor:
    """BackdoorBench's default BadNets trigger at the image size: uint8 C x H x W, 255 on the square, else 0.

    The 32x32 mask is resized with nearest neighbour: at 32x32 the square is rows/cols 29-31, at 28x28 rows/cols
    25-27, at 16x16 a 2x2 square at rows/cols 14-15.
    """
    base = torch.zeros(BADNET_BASE, BADNET_BASE, dtype=torch.uint8)
    base[-BADNET_SQUARE:, -BADNET_SQUARE:] = 255
    # nearest neighbour with PIL's pixel-centre convention: output i reads input floor((i + 0.5) * 32 / size)
    rows = ((torch.arange(height) + 0.5) * BADNET_BASE / height).floor().long().clamp_(max=BADNET_BASE - 1)
    cols = ((torch.arange(width) + 0.5) * BADNET_BASE / width).floor().long().clamp_(max=BADNET_BASE - 1)
    mask = base[rows][:, cols]
    return mask.unsqueeze(0).expand(channels, height, width).contiguous()


def apply_patch(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixels where the trigger is > 0 take the trigger's value; the rest keep the image's."""
    return torch.where(mask.unsqueeze(0) > 0, mask.unsqueeze(0), images)


# ---------------------------------------------------------------------------------------------------------
# Blended
# ---------------------------------------------------------------------------------------------------------
def default_blend_pattern(height: int, width: int, channels: int, seed: int = 0, cells: int = 8) -> torch.Tensor:
    """A fixed smooth pattern (our stand-in for BackdoorBench's hello_kitty.jpeg, which is not ours to ship).

    Uniform noise on a ``cells`` x ``cells`` grid, upsampled bicubically and stretched to 0-255: smooth enough to
    survive the random-crop augmentation, deterministic for a given seed and size.
    """
    g = torch.Generator().manual_seed(int(seed))
    low = torch.rand(1, channels, cells, cells, generator=g, dtype=torch.float64)
    up = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=True)[0]
    up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)
    return _to_uint8(up * 255.0)


def blend(images: torch.Tensor, trigger: torch.Tensor, alpha: float) -> torch.Tensor:
    """``round((1 - alpha) * x + alpha * trigger)`` per pixel, on the 0-255 scale."""
    out = (1.0 - alpha) * images.double() + alpha * trigger.unsqueeze(0).double()
    return _to_uint8(out)


# ---------------------------------------------------------------------------------------------------------
# SIG
# ---------------------------------------------------------------------------------------------------------
def sig_pattern(height: int, width: int, delta: float, f: float) -> torch.Tensor:
    """The horizontal sinusoid ``delta * sin(2 * pi * j * f / W)`` (float64 H x W, 0-255 scale)."""
    j = torch.arange(width, dtype=torch.float64)
    row = delta * torch.sin(2 * math.pi * j * f / width)
    return row.unsqueeze(0).expand(height, width)


def add_signal(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``round(clip(x + pattern, 0, 255))``, the same signal on every channel."""
    return _to_uint8(images.double() + pattern.view(1, 1, *pattern.shape))


# ---------------------------------------------------------------------------------------------------------
# WaNet
# ---------------------------------------------------------------------------------------------------------
def identity_grid(height: int, width: int) -> torch.Tensor:
    """1 x H x W x 2 sampling grid (x, y) in [-1, 1] that reproduces the image under ``align_corners=True``."""
    ys = torch.linspace(-1, 1, height)
    xs = torch.linspace(-1, 1, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0)


def wanet_noise_grid(height: int, width: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """The paper's warping field before scaling: a random k x k x 2 control grid in [-1, 1], normalised to mean
    absolute value 1, upsampled bicubically to H x W (1 x H x W x 2)."""
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / ins.abs().mean()
    return F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def wanet_grid(noise_grid: torch.Tensor, s: float, grid_rescale: float = 1.0) -> torch.Tensor:
    """The backdoor warp: identity + s * field / size (per axis), times grid_rescale, clipped to [-1, 1]."""
    _, h, w, _ = noise_grid.shape
    scale = torch.tensor([w, h], dtype=noise_grid.dtype)
    grid = (identity_grid(h, w) + s * noise_grid / scale) * grid_rescale
    return grid.clamp(-1, 1)


def cross_grids(grid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Noise-mode grids: the backdoor grid plus independent uniform noise of up to one pixel, per sample."""
    _, h, w, _ = grid.shape
    scale = torch.tensor([w, h], dtype=grid.dtype)
    noise = (torch.rand(n, h, w, 2, generator=generator) * 2 - 1) / scale
    return (grid + noise).clamp(-1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample float images (N x C x H x W in [0,1]) through ``grid`` (1 or N x H x W x 2), bilinear."""
    if len(x) == 0:
        return x
    grid = grid.to(device=x.device, dtype=x.dtype)
    if grid.shape[0] == 1 and len(x) != 1:
        grid = grid.expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp_(0, 1)


def warp_uint8(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """:func:`warp` for uint8 images, rounded back to 8 bits (what the record's PNGs hold)."""
    return _to_uint8(warp(images.float() / 255.0, grid) * 255.0)


def random_crop_rotate(x: torch.Tensor, crop: int, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """WaNet's post-poisoning augmentation, vectorised: a random shift of up to ``crop`` pixels (zero padding, as a
    padded random crop) and a random rotation of up to ``degrees``, as one affine resampling per sample."""
    n, _, h, w = x.shape
    if n == 0 or (crop <= 0 and degrees <= 0):
        return x
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    shift = torch.randint(-crop, crop + 1, (n, 2), generator=generator).float() if crop > 0 else torch.zeros(n, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2] = 2 * shift[:, 0] / w  # align_corners=False: one pixel is 2 / size in grid units
    theta[:, 1, 2] = 2 * shift[:, 1] / h
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
