"""ImageSet: the one dataset view every stage passes along.

Images are held in memory, either as uint8 (exact 8-bit pixels, as read from disk) or as float32 in [0,1]
(calibrated or synthesised data), always N x C x H x W and never normalised: normalisation lives inside
the model wrapper. Items follow BackdoorBench's 5-tuple order, ``(image, label, original_index,
poison_flag, original_label)``, so code written against its ``prepro_cls_DatasetBD_v2`` reads ours the same
way; for batches, :meth:`ImageSet.batches` is much faster than a per-sample DataLoader on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch


@dataclass
class Batch:
    x: torch.Tensor  # float N x C x H x W in [0,1]
    y: torch.Tensor  # label used for training/ASR (the poisoned label for poisoned samples)
    index: torch.Tensor  # index into the underlying full dataset
    poison: torch.Tensor  # 1 where the sample is poisoned
    original: torch.Tensor  # the true label
    source: torch.Tensor  # provenance code (see ImageSet.sources)

    def __iter__(self):  # allows ``x, y, idx, flag, orig, src = batch``
        return iter((self.x, self.y, self.index, self.poison, self.original, self.source))

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))


def _as_long(t, n: int, default: torch.Tensor | None = None) -> torch.Tensor:
    if t is None:
        return default if default is not None else torch.zeros(n, dtype=torch.long)
    t = torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t)
    return t.to(torch.long).reshape(-1)


class ImageSet(torch.utils.data.Dataset):
    """Images with labels, original labels, poison flags, dataset indices and per-sample provenance."""

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: Sequence[int] | torch.Tensor | np.ndarray,
        original_labels=None,
        poison=None,
        indices=None,
        sources=None,
        source_names: Sequence[str] = ("default",),
        name: str = "",
    ):
        images = torch.as_tensor(images)
        if images.dim() != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise TypeError(f"images must be uint8 or float32, got {images.dtype}")
        if images.dtype == torch.float32 and images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError("float images must lie in [0,1] (no normalisation happens before the model)")
        n = images.shape[0]
        self.images = images
        self.labels = _as_long(labels, n)
        self.original_labels = _as_long(original_labels, n, self.labels.clone())
        self.poison = _as_long(poison, n)
        self.indices = _as_long(indices, n, torch.arange(n, dtype=torch.long))
        self.sources = _as_long(sources, n)
        self.source_names = list(source_names)
        self.name = name
        for field_name in ("labels", "original_labels", "poison", "indices", "sources"):
            if getattr(self, field_name).shape[0] != n:
                raise ValueError(f"{field_name} has {getattr(self, field_name).shape[0]} entries for {n} images")

    # -- dataset protocol ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return (self.image(i), int(self.labels[i]), int(self.indices[i]), int(self.poison[i]), int(self.original_labels[i]))

    def image(self, i) -> torch.Tensor:
        img = self.images[i]
        return img.float().div_(255.0) if img.dtype == torch.uint8 else img.clone()

    def float_images(self, positions=None) -> torch.Tensor:
        imgs = self.images if positions is None else self.images[positions]
        return imgs.float().div_(255.0) if imgs.dtype == torch.uint8 else imgs.clone()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)"""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def is_uint8(self) -> bool:
        return self.images.dtype == torch.uint8

    # -- derived views ----------------------------------------------------------------------------------
    def subset(self, positions, name: str | None = None) -> "ImageSet":
        pos = torch.as_tensor(np.asarray(positions) if not isinstance(positions, torch.Tensor) else positions).long()
        return ImageSet(
            self.images[pos], self.labels[pos], self.original_labels[pos], self.poison[pos], self.indices[pos],
            self.sources[pos], self.source_names, name if name is not None else self.name,
        )

    def with_images(self, images: torch.Tensor, name: str | None = None) -> "ImageSet":
        """Same samples and metadata, new pixels (e.g. after calibration)."""
        if images.shape[0] != len(self):
            raise ValueError(f"{images.shape[0]} images for a set of {len(self)}")
        return ImageSet(images, self.labels, self.original_labels, self.poison, self.indices, self.sources,
                        self.source_names, name if name is not None else self.name)

    def with_labels(self, labels) -> "ImageSet":
        return ImageSet(self.images, labels, self.original_labels, self.poison, self.indices, self.sources,
                        self.source_names, self.name)

    def class_counts(self, num_classes: int, use_original: bool = False) -> np.ndarray:
        lab = self.original_labels if use_original else self.labels
        return np.bincount(lab.numpy(), minlength=num_classes)

    def positions_of_source(self, source: str) -> torch.Tensor:
        code = self.source_names.index(source)
        return torch.nonzero(self.sources == code).flatten()

    @staticmethod
    def concat(sets: Sequence["ImageSet"], name: str = "") -> "ImageSet":
        """Concatenate, keeping provenance: each input's source names are merged into one table."""
        if not sets:
            raise ValueError("nothing to concatenate")
        shapes = {s.shape for s in sets}
        if len(shapes) != 1:
            raise ValueError(f"cannot concatenate image sets of different shapes: {sorted(shapes)}")
        any_float = any(not s.is_uint8 for s in sets)
        names: list[str] = []
        src_parts = []
        for s in sets:
            remap = []
            for sn in s.source_names:
                if sn not in names:
                    names.append(sn)
                remap.append(names.index(sn))
            src_parts.append(torch.as_tensor(remap, dtype=torch.long)[s.sources])
        imgs = [s.float_images() if any_float else s.images for s in sets]
        return ImageSet(
            torch.cat(imgs), torch.cat([s.labels for s in sets]), torch.cat([s.original_labels for s in sets]),
            torch.cat([s.poison for s in sets]), torch.cat([s.indices for s in sets]), torch.cat(src_parts), names, name,
        )

    # -- iteration ------------------------------------------------------------------------------------------
    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        positions: torch.Tensor | None = None,
    ) -> Iterator[Batch]:
        """Yield :class:`Batch` objects with float images on ``device``.

        ``generator`` drives the shuffle and the augmentation, so one seed fixes the data order.
        """
        device = torch.device(device)
        n = len(self) if positions is None else len(positions)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if positions is not None:
            order = positions[order]
        stop = n - (n % batch_size) if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) == 0:
                break
            x = self.images[idx]
            if device.type == "cuda":
                x = x.pin_memory().to(device, non_blocking=True)
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            if augment is not None:
                x = augment(x, generator)
            yield Batch(x, self.labels[idx].to(device), self.indices[idx].to(device), self.poison[idx].to(device),
                        self.original_labels[idx].to(device), self.sources[idx].to(device))

    def __repr__(self) -> str:
        kind = "uint8" if self.is_uint8 else "float"
        return f"ImageSet({self.name or 'unnamed'}: {len(self)} x {self.shape} {kind}, {int(self.poison.sum())} poisoned)"
