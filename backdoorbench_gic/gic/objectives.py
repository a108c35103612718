"""What g is trained to do, through the frozen victim (eval mode): registered objective classes.

A fit minimises ``sum_k weight_k * objective_k`` over the objectives named in the config's ``objectives`` mapping
(``{bn: 1.0}`` by default; a value is a weight, or ``{weight: w, <option>: value, ...}``). Each objective is one
class registered in :data:`OBJECTIVES`; a new objective is one more class, with no edit to the fitting loop.

An objective is built once per fit with the frozen victim and the raw auxiliary set (so it can precompute
references from them: a label prior, class prototypes, an inferred target class) and may register forward hooks
on the victim. Each step the loop runs the victim once on g(x) and hands every objective a :class:`Forward`
(logits, penultimate features, labels); hooks have already seen the same pass.

Built in:
- ``bn``: BatchNorm-statistics alignment. For each BN layer, the batch moments of the layer's input on g(x)
  against the running ones (:mod:`backdoorbench_gic.bnstats`: symmetric Gaussian KL by default, or ``w2``),
  averaged over channels and then over layers (``layer_weights``: uniform, early, late or a list). The same
  divergence ``bbgic aux-quality`` reports as D_BN, per batch. Label-free.
- ``ce``: cross-entropy of the victim on g(x) against the auxiliary labels.
- ``infomax``: label-free information maximisation, mean prediction entropy minus the batch-mean's entropy.
- ``drift``: KL(batch-mean prediction || label prior), against calibration piling predictions onto one class.
- ``feature``: class-conditional penultimate-feature alignment against the victim's own classifier. Before the
  fit, each class's prototype is the mean penultimate feature of the raw auxiliary images of that label that the
  victim classifies correctly with the highest confidence (the ``top`` share of them): the images the victim finds
  most training-like. The loss is the squared distance between each class's batch mean of phi(g(x)) and its
  prototype, in units of the raw set's per-dimension feature spread.
- ``guard``: a trigger guard. The target class is inferred from the auxiliary data, never given: the class whose
  share of the victim's predictions on the raw set exceeds its label share the most (what the drift monitor
  measures). The loss is the mean probability the victim gives that class on calibrated images labelled
  otherwise, so g cannot make the auxiliary data look like the backdoor's input.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bnstats import DISTANCES, BNBatchStats
from ..bnstats import layer_weights as bn_layer_weights
from ..config import ConfigError
from ..data.imageset import ImageSet
from ..registry import Registry

log = logging.getLogger(__name__)

OBJECTIVES = Registry("gic objective")


@dataclass
class Forward:
    """One pass of the victim on a calibrated batch."""

    logits: torch.Tensor
    features: torch.Tensor  # penultimate features (the head's input)
    y: torch.Tensor | None  # auxiliary labels (None when the set has none)

    _probs: torch.Tensor | None = None

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None:
            self._probs = self.logits.float().softmax(-1)
        return self._probs


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def label_prior(aux: ImageSet, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(aux.labels, minlength=num_classes).float()
    return counts / counts.sum().clamp_min(1)


@torch.no_grad()
def victim_outputs(victim: nn.Module, aux: ImageSet, device: torch.device,
                   batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features) of the victim on the raw set, on the CPU."""
    logits, feats = [], []
    for batch in aux.batches(batch_size, device=device):
        f = victim.features(batch.x)
        feats.append(f.float().cpu())
        logits.append(victim.head(f).float().cpu())
    return torch.cat(logits), torch.cat(feats)


class Objective:
    """Base: ``options`` are the class's keyword arguments (an unknown one is an error naming it)."""

    name: ClassVar[str] = "objective"
    needs_labels: ClassVar[bool] = False

    def __init__(self, victim: nn.Module, aux: ImageSet, device: torch.device, num_classes: int):
        self.victim = victim

    def __call__(self, out: Forward) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Remove hooks."""


@OBJECTIVES.register("bn")
class BNObjective(Objective):
    def __init__(self, victim, aux, device, num_classes, layer_weights: str | Sequence[float] = "uniform",
                 distance: str = "kl"):
        super().__init__(victim, aux, device, num_classes)
        if distance not in DISTANCES:
            raise ConfigError(f"objective 'bn': distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        self.stats = BNBatchStats(victim, distance)
        self.layer_w = bn_layer_weights(len(self.stats.layers), layer_weights).float()

    def __call__(self, out: Forward) -> torch.Tensor:
        d = self.stats.divergences()
        return (d * self.layer_w.to(d.device)).sum()

    def close(self) -> None:
        self.stats.remove()


@OBJECTIVES.register("ce")
class CEObjective(Objective):
    needs_labels = True

    def __call__(self, out: Forward) -> torch.Tensor:
        return F.cross_entropy(out.logits.float(), out.y)


@OBJECTIVES.register("infomax")
class InfomaxObjective(Objective):
    def __call__(self, out: Forward) -> torch.Tensor:
        p = out.probs
        return entropy(p).mean() - entropy(p.mean(0))


@OBJECTIVES.register("drift")
class DriftObjective(Objective):
    def __init__(self, victim, aux, device, num_classes):
        super().__init__(victim, aux, device, num_classes)
        self.prior = label_prior(aux, num_classes).to(device)

    def __call__(self, out: Forward) -> torch.Tensor:
        mean_p = out.probs.mean(0)
        return (mean_p * (torch.log(mean_p.clamp_min(1e-12)) - torch.log(self.prior.clamp_min(1e-12)))).sum()


@OBJECTIVES.register("feature")
class FeatureObjective(Objective):
    needs_labels = True

    def __init__(self, victim, aux, device, num_classes, top: float = 0.25):
        super().__init__(victim, aux, device, num_classes)
        if not 0 < top <= 1:
            raise ConfigError(f"objective 'feature': top must be in (0, 1], got {top}")
        logits, feats = victim_outputs(victim, aux, device)
        conf = logits.softmax(-1).gather(1, aux.labels.view(-1, 1)).squeeze(1)
        correct = logits.argmax(1) == aux.labels
        protos = torch.zeros(num_classes, feats.shape[1])
        present = torch.zeros(num_classes, dtype=torch.bool)
        for c in range(num_classes):
            idx = torch.nonzero((aux.labels == c) & correct).flatten()
            if len(idx) == 0:
                continue
            k = max(1, int(round(top * len(idx))))
            chosen = idx[conf[idx].topk(k).indices]
            protos[c] = feats[chosen].mean(0)
            present[c] = True
        self.protos = protos.to(device)
        self.present = present.to(device)
        self.scale = feats.var(0, unbiased=False).mean().clamp_min(1e-8).to(device)

    def __call__(self, out: Forward) -> torch.Tensor:
        y = out.y
        onehot = F.one_hot(y, self.protos.shape[0]).float() * self.present[y].float().unsqueeze(1)
        counts = onehot.sum(0)
        used = counts > 0
        if not used.any():
            return out.features.sum() * 0.0
        means = (onehot.t() @ out.features.float())[used] / counts[used].unsqueeze(1)
        return ((means - self.protos[used]) ** 2).mean() / self.scale


def infer_target(victim: nn.Module, aux: ImageSet, device: torch.device, num_classes: int) -> tuple[int, float]:
    """(class, excess share): the class the victim over-predicts most on the raw set relative to its labels."""
    logits, _ = victim_outputs(victim, aux, device)
    pred = torch.bincount(logits.argmax(1), minlength=num_classes).float() / max(len(aux), 1)
    excess = pred - label_prior(aux, num_classes)
    t = int(excess.argmax())
    return t, float(excess[t])


@OBJECTIVES.register("guard")
class TriggerGuard(Objective):
    def __init__(self, victim, aux, device, num_classes):
        super().__init__(victim, aux, device, num_classes)
        self.target, self.excess = infer_target(victim, aux, device, num_classes)
        log.info("trigger guard: inferred target class %d (its predicted share exceeds its label share by %.1f points)",
                 self.target, 100 * self.excess)

    def __call__(self, out: Forward) -> torch.Tensor:
        p_t = out.probs[:, self.target]
        if out.y is not None:
            mask = (out.y != self.target).float()
            return (p_t * mask).sum() / mask.sum().clamp_min(1)
        return p_t.mean()


def parse_objectives(spec: Mapping[str, Any]) -> dict[str, tuple[float, dict[str, Any]]]:
    """``{name: weight | {weight: w, **options}}`` -> ``{name: (weight, options)}``, validated against the registry
    and each class's signature (an unknown objective or option is an error naming it)."""
    import inspect

    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError("key 'objectives': must be a non-empty mapping {name: weight}, e.g. {bn: 1.0}")
    out: dict[str, tuple[float, dict[str, Any]]] = {}
    for name, value in spec.items():
        try:
            cls = OBJECTIVES.get(str(name))
        except KeyError as exc:
            raise ConfigError(f"key 'objectives': {exc}") from None
        if isinstance(value, Mapping):
            options = {k: v for k, v in value.items() if k != "weight"}
            weight = value.get("weight", 1.0)
        else:
            options, weight = {}, value
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"key 'objectives': the weight of {name!r} must be a number, got {weight!r}") from None
        if weight < 0:
            raise ConfigError(f"key 'objectives': the weight of {name!r} must be >= 0, got {weight}")
        params = inspect.signature(cls.__init__).parameters
        known = [p for p in params if p not in ("self", "victim", "aux", "device", "num_classes")]
        for k in options:
            if k not in known:
                raise ConfigError(f"key 'objectives': objective {name!r} has no option {k!r}"
                                  + (f" (options: {', '.join(known)})" if known else " (it takes none)"))
        out[str(name)] = (weight, options)
    if not any(w > 0 for w, _ in out.values()):
        raise ConfigError("key 'objectives': at least one objective needs a weight > 0")
    return out


class GICObjective:
    """The weighted sum of the configured objectives; returns the loss and its parts."""

    def __init__(self, victim: nn.Module, aux: ImageSet, spec: Mapping[str, Any], device: torch.device,
                 num_classes: int):
        self.victim = victim
        self.terms: list[tuple[str, float, Objective]] = []
        try:
            for name, (weight, options) in parse_objectives(spec).items():
                if weight == 0:
                    continue
                cls = OBJECTIVES.get(name)
                self.terms.append((name, weight, cls(victim, aux, device, num_classes, **options)))
        except Exception:
            self.close()
            raise
        self.needs_labels = any(obj.needs_labels for _, _, obj in self.terms)

    def __call__(self, x_cal: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        if self.needs_labels and y is None:
            raise ValueError("the configured objectives need auxiliary labels")
        feats = self.victim.features(x_cal)
        out = Forward(self.victim.head(feats).float(), feats, y)
        parts = {name: obj(out) for name, _, obj in self.terms}
        loss = sum(w * parts[name] for name, w, _ in self.terms)
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def close(self) -> None:
        for _, _, obj in self.terms:
            obj.close()
