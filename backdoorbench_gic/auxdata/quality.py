"""How far an auxiliary set is from the victim's training distribution, measured with the victim alone.

The defender has no training data, but the victim carries two summaries of it: its BatchNorm running
statistics (the training data's per-channel mean and variance at every BN layer) and its own predictions. One
eval-mode pass over the set (forward pre-hooks on the BN layers, plus the penultimate features and logits)
gives four signals, and a second pass on a copy whose BN statistics adapted to the set a fifth:

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
(e) Entropy after adaptation ``H_a``: the prediction entropy (as in (b)) of a copy of the victim whose BN running
    statistics were re-estimated on the set itself (train-mode passes, cumulative average). Purification trains in
    train mode, so its BN layers normalise with the set's own statistics: ``H_a`` is the uncertainty that remains once
    BN has absorbed what it can (global intensity shifts), i.e. what the weights will have to learn.

Headline, the purification risk (a rank score: higher = purification with this set loses more clean accuracy):

    risk = D_BN * (H_a / 0.25)^4

D_BN is the shift purification writes into the BN statistics; ``(H_a / 0.25)^4`` (1 at ``H_a`` = 1/4) raises it for
sets whose content the victim still cannot read after BN adapts (rotation, mixtures), which D_BN underrates. The form
(a product; the exponent 4 of {0, 0.5, 1, 2, 3, 4, 5, 6}, the best mean rho) was chosen on the 20-per-class efficacy
block (both victims, FT/FST/SAU). Scored as the mean over the three draws the efficacy seeds purify with, its rho with
the C-Acc lost is +0.70 to +0.95 there (D_BN alone +0.66 to +0.89) and +0.85 to +0.98 on the 5 % blocks it was not
designed on (D_BN alone +0.70 to +0.88; the earlier composite ``alignment`` below -0.30 to -0.37, the wrong way
round); BENCHMARKS.md, "Auxiliary data", and ``benchmarks/aux_evidence.py``.
It needs no test data and no reference set: only the victim and the candidate set.

Verdicts (``verdict`` column; what to do in :data:`VERDICTS`):
- ``close``: with a reference set (``--reference reserved``), risk <= 2 x the reference's; without one, risk < 0.002
  (the benchmark victims' own train/reserved/brightness sets scored 0.0004-0.0018, but the scale moves with the
  victim's confidence, so give a reference when you have one): use it.
- ``shifted``: otherwise: purification lost up to 16 C-Acc points with such sets in the benchmarks; prefer a set
  with a lower risk; compare candidates with the risk column (it ranks them, it is not a forecast in points).
- ``fitted``: the victim is confident on the set only with its own statistics (``entropy < H_a / 3``): images
  optimised against the victim (model inversion); purification with them lost 25-65 C-Acc points: do not use alone.

The earlier composite ``alignment = exp(-D_BN) * (1 - H) * (1 - TVD)`` (higher = better) is still reported, but it
does not rank purification outcomes: D_BN is small in absolute terms, so exp(-D_BN) is about 1 for every set, and
inversion images (confident, evenly classified) score best while purifying worst.

Reading the numbers:
- ``D_BN`` of the victim's own clean training images is not 0 for a real victim: its running statistics were
  averaged over augmented, poisoned batches while the weights moved. Compare a set with the ``train`` or
  ``reserved`` row of the same victim, not with 0.
- ``synthetic:inversion`` is optimised for the BN statistics and the victim's confidence, so its eval-mode entropy
  and alignment look excellent by construction; its Frechet distance to ``reserved`` and the ``fitted`` verdict
  show how far it is.
- A flag is a lead, not a verdict: strong shifts (colour jitter) also pile predictions onto some class. A class
  flagged across several unrelated sets is the stronger hint of a backdoor target.
- Risk values are comparable between sets on one victim; across victims and architectures the scale moves (a
  confident victim has a lower ``H_a``), so rank candidates per victim.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..bnstats import BNMoments, NoBatchNormError, batchnorm_layers, recalibrate_bn, symmetric_gaussian_kl  # noqa: F401
from ..data.imageset import ImageSet

log = logging.getLogger(__name__)

HEADLINE = "risk"
RISK_ENTROPY_SCALE = 0.25  # H_a at which the entropy factor is 1
RISK_ENTROPY_POWER = 4.0
CLOSE_RISK = 0.002  # without a reference: below, as close as the benchmark victims' own train/reserved sets
CLOSE_RATIO = 2.0  # with a reference set: close = at most this multiple of the reference's risk
FITTED_ENTROPY_RATIO = 1.0 / 3.0  # eval-mode entropy below this share of H_a: the set was fitted to the victim

# what to do with each verdict (printed by `bbgic aux-quality`)
VERDICTS: dict[str, str] = {
    "close": "use it: purification should cost about what in-distribution data costs",
    "shifted": "expect purification to lose C-Acc (up to 16 points with such sets in BENCHMARKS.md); prefer a candidate "
               "with a lower risk, and check C-Acc after purifying",
    "fitted": "images fitted to the victim (e.g. model inversion): purification with them lost 25-65 C-Acc points in "
              "BENCHMARKS.md; do not purify with this set alone",
    "unknown": "the victim has no BatchNorm statistics: no risk; compare entropy and hist_tvd with a reference set",
}

# every table column's reading: which direction is better (printed by `bbgic aux-quality`, used by aux_evidence)
SIGNAL_DIRECTIONS: dict[str, str] = {
    "risk": "lower is better (headline: ranks sets by the C-Acc purification loses)",
    "bn_div": "lower is better (0 = the training data's BN statistics)",
    "bn_first": "lower is better (first BN layer only)",
    "bn_max": "lower is better (worst BN layer)",
    "entropy_adapted": "lower is better (uncertainty left after BN adapts to the set)",
    "entropy": "closer to the reserved/train row is better (far lower: fitted to the victim; higher: unreadable)",
    "confidence": "closer to the reserved/train row is better",
    "accuracy": "higher is better, up to the reserved/train row (1.0 on synthetic sets means fitted)",
    "hist_tvd": "lower is better (predictions distributed like the labels)",
    "top_attraction": "lower is better (1 = no class pulls in extra predictions)",
    "fd": "lower is better (0 = the reference set's features)",
    "alignment": "higher was meant better; it does not rank purification outcomes, kept for comparison",
}


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
    entropy_adapted: float = float("nan")
    risk: float = float("nan")
    verdict: str = "unknown"
    bn_layers: list[tuple[str, float]] = field(default_factory=list)
    pred_hist: list[float] = field(default_factory=list)
    label_hist: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The table row: name and size, the headline and its verdict first, then the signals."""
        d = asdict(self)
        for k in ("bn_layers", "pred_hist", "label_hist"):
            d.pop(k)
        d["flagged"] = " ".join(map(str, self.flagged))
        order = ["name", "n", "risk", "verdict", "bn_div", "entropy_adapted"]
        return {k: d[k] for k in order + [k for k in d if k not in order]}


def purification_risk(bn_div: float, entropy_adapted: float) -> float:
    """``D_BN * (H_a / 0.25)^4`` (module docstring); NaN without BN statistics."""
    if not (bn_div == bn_div) or not (entropy_adapted == entropy_adapted):
        return float("nan")
    return float(bn_div * (entropy_adapted / RISK_ENTROPY_SCALE) ** RISK_ENTROPY_POWER)


def risk_verdict(risk: float, entropy: float, entropy_adapted: float, reference_risk: float | None = None) -> str:
    """``fitted``, ``close``, ``shifted`` or ``unknown`` (no BN statistics); see :data:`VERDICTS`. With the risk of a
    reference set of the same victim (e.g. ``reserved``), close means at most ``CLOSE_RATIO`` times it (the scale
    moves between victims); without, below ``CLOSE_RISK``."""
    if not (risk == risk):
        return "unknown"
    if entropy < FITTED_ENTROPY_RATIO * entropy_adapted:
        return "fitted"
    if reference_risk is not None and reference_risk == reference_risk:
        return "close" if risk <= CLOSE_RATIO * reference_risk else "shifted"
    return "close" if risk < CLOSE_RISK else "shifted"


def close_bound(reference_risk: float | None = None) -> float:
    """The risk at or below which a set is ``close`` (:func:`risk_verdict`): ``CLOSE_RATIO`` x the reference's
    risk, else ``CLOSE_RISK`` (where the bound itself already counts as shifted)."""
    if reference_risk is not None and reference_risk == reference_risk:
        return CLOSE_RATIO * reference_risk
    return CLOSE_RISK


def verdict_rule(reference: str | None = None, reference_risk: float | None = None) -> str:
    """The verdict rule in words, e.g. ``close: risk at most 2 x the reference reserved's 0.0016``."""
    if reference_risk is not None and reference_risk == reference_risk:
        return f"close: risk at most {CLOSE_RATIO:g} x the reference {reference}'s {reference_risk:.3g}"
    return f"close: risk below {CLOSE_RISK:g}"


def _entropy(logits: torch.Tensor, num_classes: int) -> float:
    """Mean prediction entropy over samples, divided by log K (0 for one class)."""
    if num_classes <= 1:
        return 0.0
    probs = F.softmax(logits.double(), dim=1)
    return float((-(probs * torch.log(probs.clamp_min(1e-300))).sum(1)).mean() / math.log(num_classes))


@torch.no_grad()
def adapted_logits(model: torch.nn.Module, data: ImageSet, device: torch.device, batch_size: int,
                   progress: bool | None = None) -> torch.Tensor | None:
    """Logits of a copy of ``model`` whose BN running statistics were re-estimated on ``data`` (train-mode passes
    of ``batch_size``, cumulative average; the weights untouched), in eval mode; None without BN layers."""
    if not batchnorm_layers(model):
        return None
    from ..utils.logs import progress_enabled
    from ..utils.progress import progress_bar

    work = recalibrate_bn(copy.deepcopy(model), data, batch_size=batch_size, device=device).eval()
    n_batches = math.ceil(len(data) / batch_size)
    out = [work(b.x).double().cpu()
           for b in progress_bar(data.batches(batch_size, device=device), total=n_batches,
                                 desc=f"adapted {data.name}", leave=False, disable=not progress_enabled(progress))]
    return torch.cat(out) if out else torch.empty(0)


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
                    progress: bool | None = None, reference_risk: float | None = None) -> QualityReport:
    """The signals, the headline ``risk`` and its verdict for one set (see the module docstring); the verdict is
    judged against ``reference_risk`` (the risk of a reference set of the same victim) when given."""
    if len(data) == 0:
        raise ValueError(f"{data.name or 'the set'} is empty")
    device = torch.device(device)
    res = _one_pass(model, data, device, batch_size, reference is not None or reference_moments is not None, progress)
    layers = res.layers
    bn_vals = [v for _, v in layers]
    bn_div = float(np.mean(bn_vals)) if bn_vals else float("nan")
    probs = F.softmax(res.logits, dim=1)
    entropy = _entropy(res.logits, num_classes)
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
    ad = adapted_logits(model, data, device, batch_size, progress) if bn_vals else None
    entropy_adapted = _entropy(ad, num_classes) if ad is not None else float("nan")
    risk = purification_risk(bn_div, entropy_adapted)
    return QualityReport(
        name=data.name, n=len(data), bn_div=bn_div, bn_first=bn_vals[0] if bn_vals else float("nan"),
        bn_max=max(bn_vals) if bn_vals else float("nan"), entropy=entropy,
        confidence=float(probs.max(1).values.mean()), accuracy=float((pred == labels).double().mean()),
        hist_tvd=tvd, top_class=top, top_share=float(pred_hist[top]), top_attraction=float(attraction[top]),
        flagged=flagged, fd=fd, alignment=float(alignment), entropy_adapted=entropy_adapted, risk=risk,
        verdict=risk_verdict(risk, entropy, entropy_adapted, reference_risk), bn_layers=layers,
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
    ref_moments, ref_risk = None, None
    if reference:
        ref_set = build_aux_set(record, reference, options=per_type[-1], **kw)
        ref_moments = reference_feature_moments(victim, ref_set, device, batch_size, progress)
        ref_risk = measure_quality(victim, ref_set, record.num_classes, device=device, batch_size=batch_size,
                                   progress=progress).risk
    from ..utils.logs import progress_enabled
    from ..utils.progress import progress_bar

    reports = []
    for t, opts in progress_bar(list(zip(types, per_type)), desc="aux-quality", unit="set",
                                disable=not progress_enabled(progress)):
        aux = build_aux_set(record, t, options=opts, **kw)
        rep = measure_quality(victim, aux, record.num_classes, reference_moments=ref_moments, device=device,
                              batch_size=batch_size, flag_margin=flag_margin, flag_ratio=flag_ratio, progress=progress,
                              reference_risk=ref_risk)
        log.info("%s: n %d, risk %.4g, verdict %s (%s), D_BN %.4f, entropy %.3f (adapted %.3f), TVD %.3f%s", t, rep.n,
                 rep.risk, rep.verdict, verdict_rule(reference, ref_risk), rep.bn_div, rep.entropy,
                 rep.entropy_adapted, rep.hist_tvd, f", flagged classes {rep.flagged}" if rep.flagged else "")
        reports.append(rep)
    df = pd.DataFrame([r.row() for r in reports])
    df.insert(0, "reserved_type", types)
    df = df.drop(columns=["name"])
    if not reference:
        df = df.drop(columns=["fd"])
    df.attrs["reference"] = reference
    df.attrs["reference_risk"] = ref_risk
    df.attrs["record"] = str(record.record_dir)
    return df, reports


VERDICT_COLORS = {"close": "tab:green", "shifted": "tab:orange", "fitted": "tab:red", "unknown": "tab:gray"}
LOG_PANELS = ("risk", "bn_div", "fd")  # values that span decades: log axes, so 2e-05 and 5e-05 look different


def _log_floor(values: Sequence[float]) -> float:
    """Where a zero (or NaN) bar ends on a log axis: a third of the smallest positive value."""
    positive = [v for v in values if v == v and v > 0]
    return min(positive) / 3.0 if positive else 1e-6


def plot_quality(df, path: str | os.PathLike, title: str | None = None) -> Path:
    """Bar plots of the headline risk, D_BN, the adapted entropy and (with a reference) FD per source. Bars are
    coloured by the table's verdict and carry their value (the risk panel also the verdict, and the class a set
    flags; flagged sets are hatched); risk, D_BN and FD on log axes, with the verdict's bound on the risk panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from ..utils.io import atomic_write_with

    cols = [("risk", "purification risk (lower = less C-Acc lost)"), ("bn_div", "BN divergence D_BN (lower)"),
            ("entropy_adapted", "entropy after BN adapts (lower)")]
    if "fd" in df.columns and df["fd"].notna().any():
        cols.append(("fd", f"Frechet distance to {df.attrs.get('reference', 'reference')}"))
    names = df["reserved_type"].tolist()
    verdicts = [v if isinstance(v, str) else "unknown" for v in df.get("verdict", ["unknown"] * len(df))]
    colors = [VERDICT_COLORS.get(v, "tab:gray") for v in verdicts]
    flags = [f.strip() if isinstance(f, str) else "" for f in df.get("flagged", [""] * len(df))]  # NaN from a CSV
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols) + 1.5, 0.5 * len(names) + 2.0), squeeze=False,
                             sharey=True)
    ref_risk = df.attrs.get("reference_risk")
    for ax, (col, label) in zip(axes[0], cols):
        values = df[col].astype(float).tolist()
        log_axis = col in LOG_PANELS
        floor = _log_floor(values) if log_axis else 0.0
        shown = [max(v, floor) if v == v else floor for v in values]
        ax.barh(names, shown, color=colors, hatch=["//" if f else "" for f in flags], edgecolor="black", linewidth=0.4)
        if log_axis:
            ax.set_xscale("log")
            ax.set_xlim(floor / 1.5, max(shown) * (60 if col == "risk" else 12))  # room for the labels
        else:
            ax.set_xlim(0, max([v for v in shown if v == v] + [1e-9]) * 1.6)
        for i, (v, x) in enumerate(zip(values, shown)):
            text = "nan" if v != v else f"{v:.2g}"
            if col == "risk":
                text += f" {verdicts[i]}" + (f", flags class {flags[i]}" if flags[i] else "")
            ax.text(x * (1.15 if log_axis else 1.0) + (0 if log_axis else ax.get_xlim()[1] * 0.02), i, text,
                    va="center", fontsize=7)
        if col == "risk":
            bound = close_bound(ref_risk)
            ax.axvline(bound, color="tab:green", linestyle="--", linewidth=0.8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0][0].invert_yaxis()
    handles = [Patch(color=VERDICT_COLORS[v], label=v) for v in VERDICT_COLORS if v in verdicts]
    handles.append(Line2D([0], [0], color="tab:green", linestyle="--", linewidth=0.8, label="bound of close (risk)"))
    if any(flags):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="a class pulls in predictions"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    rule = verdict_rule(df.attrs.get("reference"), ref_risk)
    fig.suptitle(((title + "; ") if title else "") + f"verdict {rule}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    atomic_write_with(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png", dpi=120))
    plt.close(fig)
    return path
