"""BackdoorBench's train/test transforms, applied to whole batches of [0,1] tensors.

BackdoorBench's train transform is Resize -> RandomCrop(H, W, padding=4) -> RandomHorizontalFlip (cifar10
only) -> ToTensor -> Normalize; the test transform is Resize -> ToTensor -> Normalize. Resizing happens once
when a dataset is loaded, and Normalize lives in the model wrapper, so what remains here is the random crop
(zero padding, as torchvision's default fill) and the flip, vectorised over the batch and driven by an
explicit generator for reproducibility.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .specs import DatasetSpec


class TrainAugment:
    """Random crop with zero padding plus optional horizontal flip, per sample, on a batch."""

    def __init__(self, padding: int = 4, hflip: bool = False):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = int(padding)
        self.hflip = bool(hflip)

    @classmethod
    def for_spec(cls, spec: DatasetSpec) -> "TrainAugment":
        return cls(spec.crop_padding, spec.hflip)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.padding:
            p = self.padding
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])  # n x h
            cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])  # n x w
            bidx = torch.arange(n, device=x.device)[:, None, None]
            # advanced indexing over (batch, row, col) with the channel slice kept: result n x h x w x c
            x = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            if flip.any():
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def __repr__(self) -> str:
        return f"TrainAugment(padding={self.padding}, hflip={self.hflip})"


def resize_uint8(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an N x H x W x C uint8 array with PIL's bilinear filter (torchvision's Resize on PIL images)."""
    from PIL import Image

    if images.shape[1] == height and images.shape[2] == width:
        return images
    out = np.empty((images.shape[0], height, width, images.shape[3]), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        arr = np.asarray(pil.resize((width, height), Image.BILINEAR))
        out[i] = arr.reshape(height, width, images.shape[3])
    return out


def nhwc_to_nchw(images: np.ndarray) -> torch.Tensor:
    if images.ndim == 3:
        images = images[:, :, :, None]
    return torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), order="C", copy=True))


def nchw_to_nhwc_uint8(images: torch.Tensor) -> np.ndarray:
    """float [0,1] or uint8 N x C x H x W -> uint8 N x H x W x C (round to nearest 8-bit level)."""
    if images.dtype != torch.uint8:
        images = (images.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous().numpy()
