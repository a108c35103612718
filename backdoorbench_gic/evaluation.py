"""Metrics as BackdoorBench computes them, and DER/RIR with the correct signs.

- C-Acc (``test_acc``): top-1 accuracy on the full clean test set.
- ASR (``test_asr``): on poisoned test images whose poisoned label differs from the true one (all-to-one
  records hold only non-target samples in bd_test), the share predicted as the poisoned label.
- RA (``test_ra``): the same images, the share predicted as their original label.
- DER = [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2
- RIR = [max(0, RA_after - RA_before) - max(0, ACC_before - ACC_after) + 1] / 2
All fractions in [0, 1]; predictions are the argmax of the logits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data.imageset import ImageSet
from .utils.logs import progress_enabled
from .utils.progress import progress_bar
from .utils.runtime import autocast, to_device


@dataclass
class Metrics:
    acc: float
    asr: float
    ra: float
    clean_loss: float = float("nan")
    bd_loss: float = float("nan")
    ra_loss: float = float("nan")
    n_clean: int = 0
    n_bd: int = 0

    def as_row(self) -> dict[str, float]:
        """BackdoorBench's column names."""
        return {
            "test_acc": self.acc,
            "test_asr": self.asr,
            "test_ra": self.ra,
            "clean_test_loss_avg_over_batch": self.clean_loss,
            "bd_test_loss_avg_over_batch": self.bd_loss,
            "ra_test_loss_avg_over_batch": self.ra_loss,
        }

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, data: ImageSet, device: torch.device | str = "cpu", batch_size: int = 512,
                   amp: bool = False) -> torch.Tensor:
    """Logits (float32, CPU) for every sample, in order; the model's train/eval mode is restored afterwards."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        batches = progress_bar(data.batches(batch_size, device=device), total=math.ceil(len(data) / batch_size),
                               desc=f"predict {data.name or 'set'}", leave=False, delay=2.0,  # quiet when quick
                               disable=not progress_enabled(None))
        for batch in batches:
            with autocast(device, amp):
                logits = model(to_device(batch.x, device))
            out.append(logits.float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def _acc_and_loss(logits: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    acc = int((logits.argmax(1) == labels).sum()) / len(labels)  # exact ratio, as BackdoorBench's correct/total
    # BackdoorBench averages the per-batch mean losses ("loss_avg_over_batch")
    losses = [F.cross_entropy(logits[i:i + batch_size], labels[i:i + batch_size]).item()
              for i in range(0, len(labels), batch_size)]
    return acc, sum(losses) / len(losses)


def evaluate(model: torch.nn.Module, clean_test: ImageSet, bd_test: ImageSet | None, device: torch.device | str = "cpu",
             batch_size: int = 512, amp: bool = False) -> Metrics:
    """C-Acc on ``clean_test``; ASR and RA on the label-flipped samples of ``bd_test``."""
    clean_logits = predict_logits(model, clean_test, device, batch_size, amp)
    acc, clean_loss = _acc_and_loss(clean_logits, clean_test.labels, batch_size)
    if bd_test is None or len(bd_test) == 0:
        return Metrics(acc, float("nan"), float("nan"), clean_loss, n_clean=len(clean_test))
    flipped = bd_test.labels != bd_test.original_labels
    bd = bd_test.subset(torch.nonzero(flipped).flatten()) if not bool(flipped.all()) else bd_test
    bd_logits = predict_logits(model, bd, device, batch_size, amp)
    asr, bd_loss = _acc_and_loss(bd_logits, bd.labels, batch_size)
    ra, ra_loss = _acc_and_loss(bd_logits, bd.original_labels, batch_size)
    return Metrics(acc, asr, ra, clean_loss, bd_loss, ra_loss, len(clean_test), len(bd))


class WeightsMemo:
    """:func:`evaluate` on fixed test sets, memoised by the network's content (every tensor of its state dict,
    wrapper included): a model scored twice with the same weights, e.g. by the last epoch's monitor and then as
    the final result, is evaluated once. Kept in memory for one run; a changed weight is a new evaluation."""

    def __init__(self, clean_test: ImageSet, bd_test: ImageSet | None, device: torch.device | str = "cpu",
                 batch_size: int = 512, amp: bool = False):
        self.clean_test, self.bd_test = clean_test, bd_test
        self.device, self.batch_size, self.amp = device, batch_size, amp
        self.memo: dict[str, Metrics] = {}
        self.evaluations = 0

    @staticmethod
    def key(model: torch.nn.Module) -> str:
        import hashlib

        from .utils.cache import hash_weights

        h = hashlib.sha1(type(model).__qualname__.encode())
        hash_weights(h, model.state_dict())  # a mapping: the wrapper's own tensors count too
        return h.hexdigest()

    def __call__(self, model: torch.nn.Module) -> Metrics:
        k = self.key(model)
        if k not in self.memo:
            self.memo = {k: evaluate(model, self.clean_test, self.bd_test, self.device, self.batch_size, self.amp)}
            self.evaluations += 1
        return self.memo[k]


def der(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """Defense effectiveness rating: 0.5 = no change, 1 = ASR removed at no accuracy cost."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def rir(acc_before: float, ra_before: float, acc_after: float, ra_after: float) -> float:
    """Robust-accuracy improvement rating: 0.5 = no change."""
    return (max(0.0, ra_after - ra_before) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def purification_success(acc_before: float, acc_after: float, asr_after: float, max_asr: float = 0.10,
                         max_acc_drop: float = 0.05) -> bool:
    """Our stated definition: ASR after <= 10 % and a clean-accuracy drop of at most 5 points."""
    return asr_after <= max_asr and (acc_before - acc_after) <= max_acc_drop


def compare(before: Metrics, after: Metrics) -> dict[str, float]:
    """The tidy before/after numbers of one purification run."""
    return {
        "acc_before": before.acc, "asr_before": before.asr, "ra_before": before.ra,
        "acc_after": after.acc, "asr_after": after.asr, "ra_after": after.ra,
        "der": der(before.acc, before.asr, after.acc, after.asr),
        "rir": rir(before.acc, before.ra, after.acc, after.ra),
        "success": float(purification_success(before.acc, after.acc, after.asr)),
    }


def eval_sets(record, limit: int | None) -> tuple[ImageSet, ImageSet | None]:
    """(clean test, poisoned test), or fixed subsets of at most ``limit`` images each: positions drawn once with
    seed 0, so every cell of a matrix (and the victim) is measured on the same images."""
    clean, bd = record.clean_test, record.bd_test
    if not limit:
        return clean, bd

    def pick(data: ImageSet) -> ImageSet:
        if len(data) <= limit:
            return data
        pos = np.sort(np.random.default_rng(0).permutation(len(data))[:limit])
        return data.subset(pos, name=f"{data.name}[{limit}]")

    return pick(clean), (pick(bd) if bd is not None else None)
