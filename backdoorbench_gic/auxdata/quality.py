"""How far an auxiliary set is from the victim's training distribution, measured with the victim alone.

The defender has no training data, but the victim carries two summaries of it: its BatchNorm running
statistics (the training data's per-channel mean and variance at every BN layer) and its own predictions. One
eval-mode pass over the set (forward pre-hooks on the BN layers, plus the penultimate features and logits)
gives four signals:

(a) BatchNorm-statistics divergence ``D_BN``. For BN layer l and channel c, let ``m, v`` be the set's mean and
    unbiased variance of that layer's input (exact dataset-level moments: sums of x and x^2 over every sample
    and spatial position, accumulated in float64 across batches, not per-batch averages), and ``mu, s2`` the
    running mean and variance; with ``v' = v + eps`` and ``s2' = s2 + eps`` (the layer's eps), the symmetric
    Kullback-Leibler divergence of the two Gaussians is

        J = 1/4 * [ v'/s2' + s2'/v' - 2 + (m - mu)^2 * (1/v' + 1/s2') ]   ( = (KL(p||q) + KL(q||p)) / 2 )

    ``D_BN`` is J averaged over the channels of a layer, then over the layers (``bn_first`` is the first
    layer's value: low-level shifts such as noise and blur show there first). 0 means the set's statistics
    equal the training data's at every layer.
(b) Prediction entropy ``H`` (mean over samples of -sum_k p_k log p_k, divided by log K so it lies in [0,1]) and
    confidence (mean max-probability); plus the victim's accuracy on the set's labels.
(c) The predicted-class histogram ``p`` against the label histogram ``q``: total-variation distance
    ``TVD = 1/2 sum_k |p_k - q_k|``, and for every class the attraction ``p_k / q_k``. A class is flagged when
    ``p_k >= q_k + flag_margin`` and ``p_k >= flag_ratio * q_k`` (defaults 0.25 and 2): a class that pulls in far
    more predictions than its share. A backdoor's target class shows up this way on trigger-like data (a
    Blended victim labelled 88-97 % of noise-shifted images as its target).
(d) With a reference set (e.g. ``reserved``), the Frechet distance of penultimate features
    ``FD = ||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` (the FID formula on the victim's features).

Summary score (higher is better aligned, in [0, 1]):

    alignment = exp(-D_BN) * (1 - H) * (1 - TVD)

1 means: BN statistics identical to the training data's, confident predictions, and predictions distributed
like the labels. Each factor catches a different failure: statistics the network never saw (exp(-D_BN)),
inputs it cannot decide on (1 - H), and inputs it decides on wrongly in bulk, e.g. toward a backdoor target
(1 - TVD). FD needs a reference and is reported beside the score, not in it.

Reading the numbers:
- ``D_BN`` of the victim's own clean training images is not 0 for a real victim: its running statistics were
  averaged over augmented, poisoned batches while the weights moved. Compare a set with the ``train`` or
  ``reserved`` row of the same victim, not with 0.
- ``synthetic:inversion`` is optimised for exactly the BN statistics and the victim's confidence, so its D_BN,
  entropy and alignment look excellent by construction; its Frechet distance to ``reserved`` is what shows how
  far it is (in a fixture run it was 8.7 against 0.07-1.9 for JPEG, blur, noise, rotation and contrast).
- A flag is a lead, not a verdict: strong shifts (colour jitter) also pile predictions onto some class. A class
  flagged across several unrelated sets is the stronger hint of a backdoor target.
- To rank candidate sets before purifying, use ``D_BN`` (and FD), not the summary score. Measured on Fashion-MNIST
  victims (BENCHMARKS.md, "Auxiliary data"): D_BN's Spearman rho with C-Acc after FT/FST/SAU was -0.66 to -0.87
  over ten set types; the summary score's only +0.08 to +0.32, because D_BN is small in absolute terms (exp(-D_BN)
  is about 1 for every set) and inversion images score best while purifying worst.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..bnstats import BNMoments, NoBatchNormError, recalibrate_bn, symmetric_gaussian_kl  # noqa: F401 (re-exported for callers)
from ..data.imageset import ImageSet

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# one pass
# ---------------------------------------------------------------------------------------------------------
@dataclass
class QualityReport:
    name: str
    n: int
    bn_div: float
    bn_first: float
    bn_max: float
    entropy: float
    confidence: float
    accuracy: float
    hist_tvd: float
    top_class: int
    top_share: float
    top_attraction: float
    flagged: list[int]
    fd: float | None
    alignment: float
    bn_layers: list[tuple[str, float]] = field(default_factory=list)
    pred_hist: list[float] = field(default_factory=list)
    label_hist: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("bn_layers", "pred_hist", "label_hist"):
            d.pop(k)
        d["flagged"] = " ".join(map(str, self.flagged))
        return d


@dataclass
class _PassResult:
    layers: list[tuple[str, float]]
    logits: torch.Tensor
    features: torch.Tensor | None


@torch.no_grad()
def _one_pass(model: torch.nn.Module, data: ImageSet, device: torch.device, batch_size: int,
              want_features: bool, progress: bool | None) -> _PassResult:
    from ..utils.logs import progress_enabled
    from ..utils.progress import progress_bar

    was_training = model.training
    model.eval()
    try:
        moments: BNMoments | None = BNMoments(model)
    except NoBatchNormError:  # no BN statistics: the other signals still apply
        moments = None
    use_features = want_features and hasattr(model, "features") and hasattr(model, "head")
    logits, feats = [], []
    try:
        n_batches = math.ceil(len(data) / batch_size)
        for batch in progress_bar(data.batches(batch_size, device=device), total=n_batches, desc=f"quality {data.name}",
                          leave=False, disable=not progress_enabled(progress)):
            if use_features:
                f = model.features(batch.x)
                out = model.head(f)
                feats.append(f.double().cpu())
            else:
                out = model(batch.x)
            logits.append(out.double().cpu())
    finally:
        if moments is not None:
            moments.remove()
        model.train(was_training)
    return _PassResult(moments.divergences() if moments is not None else [], torch.cat(logits) if logits else torch.empty(0),
                       torch.cat(feats) if feats else None)


def feature_moments(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().numpy()
    mean = f.mean(0)
    cov = np.cov(f, rowvar=False) if len(f) > 1 else np.zeros((f.shape[1], f.shape[1]))
    return mean, np.atleast_2d(cov)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigen-decompositions (stable)."""
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(w, 0, None)).sum())
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)  # >= 0 mathematically; rank-deficient covariances leave -1e-6-sized rounding


def measure_quality(model: torch.nn.Module, data: ImageSet, num_classes: int, *, reference: ImageSet | None = None,
                    reference_moments: tuple[np.ndarray, np.ndarray] | None = None, device: torch.device | str = "cpu",
                    batch_size: int = 256, flag_margin: float = 0.25, flag_ratio: float = 2.0,
                    progress: bool | None = None) -> QualityReport:
    """The four signals and the alignment score for one set (see the module docstring)."""
    if len(data) == 0:
        raise ValueError(f"{data.name or 'the set'} is empty")
    device = torch.device(device)
    res = _one_pass(model, data, device, batch_size, reference is not None or reference_moments is not None, progress)
    layers = res.layers
    bn_vals = [v for _, v in layers]
    bn_div = float(np.mean(bn_vals)) if bn_vals else float("nan")
    probs = F.softmax(res.logits, dim=1)
    ent = -(probs * torch.log(probs.clamp_min(1e-300))).sum(1)
    entropy = float(ent.mean() / math.log(num_classes)) if num_classes > 1 else 0.0
    pred = probs.argmax(1)
    labels = data.labels.long()
    pred_hist = np.bincount(pred.numpy(), minlength=num_classes)[:num_classes] / len(data)
    label_hist = np.bincount(labels.numpy(), minlength=num_classes)[:num_classes] / len(data)
    tvd = float(0.5 * np.abs(pred_hist - label_hist).sum())
    attraction = pred_hist / np.maximum(label_hist, 1.0 / len(data))
    flagged = [int(k) for k in range(num_classes)
               if pred_hist[k] >= label_hist[k] + flag_margin and pred_hist[k] >= flag_ratio * label_hist[k]]
    top = int(np.argmax(pred_hist))
    fd = None
    if res.features is not None and (reference is not None or reference_moments is not None):
        if reference_moments is None:
            ref_pass = _one_pass(model, reference, device, batch_size, True, progress)
            reference_moments = feature_moments(ref_pass.features)
        mu, cov = feature_moments(res.features)
        fd = frechet_distance(mu, cov, *reference_moments)
    alignment = (math.exp(-bn_div) if bn_vals else 1.0) * (1.0 - entropy) * (1.0 - tvd)
    return QualityReport(
        name=data.name, n=len(data), bn_div=bn_div, bn_first=bn_vals[0] if bn_vals else float("nan"),
        bn_max=max(bn_vals) if bn_vals else float("nan"), entropy=entropy,
        confidence=float(probs.max(1).values.mean()), accuracy=float((pred == labels).double().mean()),
        hist_tvd=tvd, top_class=top, top_share=float(pred_hist[top]), top_attraction=float(attraction[top]),
        flagged=flagged, fd=fd, alignment=float(alignment), bn_layers=layers,
        pred_hist=pred_hist.tolist(), label_hist=label_hist.tolist())


def reference_feature_moments(model: torch.nn.Module, reference: ImageSet, device: torch.device | str = "cpu",
                              batch_size: int = 256, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    res = _one_pass(model, reference, torch.device(device), batch_size, True, progress)
    if res.features is None:
        raise ValueError("the victim exposes no penultimate features (.features/.head): no Frechet distance")
    return feature_moments(res.features)


# ---------------------------------------------------------------------------------------------------------
# tables and plots over several sources of one record
# ---------------------------------------------------------------------------------------------------------
def quality_table(record, reserved_types: Sequence[str], *, reference: str | None = None, ratio: float | None = 0.05,
                  n_per_class: int | None = None, seed: int = 0, options: dict | None = None,
                  victim: torch.nn.Module | None = None, device: torch.device | str = "cpu", batch_size: int = 256,
                  flag_margin: float = 0.25, flag_ratio: float = 2.0, progress: bool | None = None):
    """A pandas DataFrame, one row per auxiliary type (built with :func:`~backdoorbench_gic.auxdata.build_aux_set`
    and the same sampling arguments; each type gets the ``options`` it accepts), plus the reports themselves."""
    import pandas as pd

    from . import build_aux_set, options_for

    device = torch.device(device)
    victim = (victim if victim is not None else record.build_model()).to(device)
    kw = dict(ratio=ratio, n_per_class=n_per_class, seed=seed, victim=victim, device=device)
    types = list(reserved_types)
    per_type = options_for(types + ([reference] if reference else []), options)
    ref_moments = None
    if reference:
        ref_set = build_aux_set(record, reference, options=per_type[-1], **kw)
        ref_moments = reference_feature_moments(victim, ref_set, device, batch_size, progress)
    reports = []
    for t, opts in zip(types, per_type):
        aux = build_aux_set(record, t, options=opts, **kw)
        rep = measure_quality(victim, aux, record.num_classes, reference_moments=ref_moments, device=device,
                              batch_size=batch_size, flag_margin=flag_margin, flag_ratio=flag_ratio, progress=progress)
        log.info("%s: n %d, D_BN %.4f, entropy %.3f, TVD %.3f, alignment %.3f%s", t, rep.n, rep.bn_div, rep.entropy,
                 rep.hist_tvd, rep.alignment, f", flagged classes {rep.flagged}" if rep.flagged else "")
        reports.append(rep)
    df = pd.DataFrame([r.row() for r in reports])
    df.insert(0, "reserved_type", types)
    df = df.drop(columns=["name"])
    if not reference:
        df = df.drop(columns=["fd"])
    df.attrs["reference"] = reference
    df.attrs["record"] = str(record.record_dir)
    return df, reports


def plot_quality(df, path: str | os.PathLike, title: str | None = None) -> Path:
    """Bar plots of the alignment score, D_BN, entropy and (with a reference) FD per source; sources with a
    flagged class in red; D_BN and FD on symmetric-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import atomic_write_with

    cols = [("alignment", "alignment (higher = closer)"), ("bn_div", "BN divergence D_BN"),
            ("entropy", "normalised entropy")]
    if "fd" in df.columns and df["fd"].notna().any():
        cols.append(("fd", f"Frechet distance to {df.attrs.get('reference', 'reference')}"))
    names = df["reserved_type"].tolist()
    colors = ["tab:red" if isinstance(f, str) and f.strip() else "tab:blue" for f in df["flagged"]]  # NaN from CSV
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols) + 1.5, 0.45 * len(names) + 1.8), squeeze=False,
                             sharey=True)
    for ax, (col, label) in zip(axes[0], cols):
        ax.barh(names, df[col].astype(float).tolist(), color=colors)
        ax.set_title(label, fontsize=10)
        if col in ("bn_div", "fd"):
            ax.set_xscale("symlog", linthresh=0.01 if col == "bn_div" else 1.0)  # values span decades
        ax.tick_params(labelsize=8)
    axes[0][0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write_with(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png", dpi=120))
    plt.close(fig)
    return path
