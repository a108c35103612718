"""The drift monitor: does calibration pile the victim's predictions onto one class?

A backdoor is a short path to its target class, so a g that raises the victim's confidence can learn
trigger-like patterns. We compare, over the auxiliary set, the label distribution with the victim's
predicted-class distribution before and after calibration, and flag the class whose predicted share grows
most beyond its label share. The defender does not know the target; the flag points at it when drift
happens. (Evaluation code may additionally report the true target's rate; nothing here uses it.)
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data.imageset import ImageSet
from ..keys import GicInfo

log = logging.getLogger(__name__)


@torch.no_grad()
def predicted_shares(victim: torch.nn.Module, data: ImageSet, num_classes: int, device: torch.device,
                     batch_size: int = 512) -> np.ndarray:
    victim.eval()
    counts = torch.zeros(num_classes, dtype=torch.long)
    for batch in data.batches(batch_size, device=device):
        pred = victim(batch.x).argmax(1).cpu()
        counts += torch.bincount(pred, minlength=num_classes)
    return (counts.double() / max(len(data), 1)).numpy()


@dataclass
class DriftReport:
    label_share: list[float]
    raw_pred_share: list[float]
    cal_pred_share: list[float]
    drift_class: int  # the class whose predicted share grew most relative to its label share
    drift_share: float  # its predicted share after calibration
    drift_ratio: float  # that share over its label share
    raw_share_of_drift_class: float
    concentrated: bool

    def message(self) -> str:
        return (f"calibration sends {self.drift_share:.1%} of the auxiliary images to class {self.drift_class} "
                f"(label share {self.label_share[self.drift_class]:.1%}, before calibration "
                f"{self.raw_share_of_drift_class:.1%}): predictions concentrate on one class, the way a backdoor's "
                "target attracts them. Consider a smaller delta, the obj_drift penalty, or inspect this class.")

    def as_row(self) -> dict[str, float]:
        return {GicInfo.DRIFT_CLASS: self.drift_class, GicInfo.DRIFT_SHARE: self.drift_share,
                GicInfo.DRIFT_RATIO: self.drift_ratio, GicInfo.DRIFT_RAW_SHARE: self.raw_share_of_drift_class,
                GicInfo.DRIFT_FLAG: float(self.concentrated)}

    def as_dict(self) -> dict:
        return asdict(self)


def drift_report(victim: torch.nn.Module, raw: ImageSet, calibrated: ImageSet, num_classes: int, device: torch.device,
                 warn_ratio: float = 2.0) -> DriftReport:
    label = np.bincount(raw.labels.numpy(), minlength=num_classes) / max(len(raw), 1)
    before = predicted_shares(victim, raw, num_classes, device)
    after = predicted_shares(victim, calibrated, num_classes, device)
    floor = 1.0 / num_classes
    ratio = after / np.maximum(label, floor / 4)
    gain = after - before
    # the class that gained most among those over-predicted after calibration
    cls = int(np.argmax(np.where(ratio > 1, gain, -np.inf))) if (ratio > 1).any() else int(np.argmax(ratio))
    concentrated = bool(ratio[cls] > warn_ratio and after[cls] > before[cls])
    report = DriftReport(label.tolist(), before.tolist(), after.tolist(), cls, float(after[cls]), float(ratio[cls]),
                         float(before[cls]), concentrated)
    if concentrated:
        log.warning(report.message())
    return report
