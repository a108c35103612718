"""What the pruning defenses (FP, ANP) share: a held-out part of the auxiliary set and the rule that picks
how much to prune from it.

BackdoorBench picks FP's pruning ratio and ANP's pruning amount by looking at the *test* set's attack success
rate. We never do: the amount is chosen on the auxiliary set alone. A seeded fraction ``val_ratio`` of the
auxiliary set is held out (the rest ranks or learns what to prune); candidates are tried in order of
increasing pruning, and the amount is the largest one whose held-out accuracy stays within ``acc_ratio``
(relative) of the unpruned model's. FP stops at the first candidate that falls below (Liu et al.'s
Fine-Pruning prunes until accuracy drops: :func:`last_within`); ANP, whose accuracy is not monotone in the
mask threshold, takes the largest candidate within the bound wherever it lies (:func:`largest_within`). With
no backdoor signal in clean data, both prune as much as clean accuracy tolerates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..config import check_range, require
from ..data.imageset import ImageSet


@dataclass
class PruningPlan:
    """What a pruning defense decided before touching the network: its ranking (FP: channels in pruning order;
    ANP: the learnt masks), the candidate amounts with their held-out accuracy, and the chosen amount."""

    ranking: torch.Tensor
    candidates: list
    holdout_acc: list[float]
    chosen: Any
    info: dict[str, Any] = field(default_factory=dict)  # what else the ranking measured (activations, mask loss)


def check_holdout_keys(cfg) -> None:
    check_range(cfg, "val_ratio", 0, 1, lo_open=True)
    require(cfg.val_ratio < 1, "val_ratio", f"must be < 1 (the rest of the auxiliary set is needed), got {cfg.val_ratio}")
    check_range(cfg, "acc_ratio", 0, 1)


def holdout(aux: ImageSet, val_ratio: float, generator: torch.Generator) -> tuple[ImageSet, ImageSet]:
    """(fit part, held-out part): a seeded random ``val_ratio`` of ``aux`` is held out (at least one image
    on each side)."""
    n = len(aux)
    if n < 2:
        raise ValueError(f"the auxiliary set has {n} image(s); a held-out part needs at least 2")
    n_val = min(max(1, round(n * val_ratio)), n - 1)
    order = torch.randperm(n, generator=generator)
    return aux.subset(order[n_val:]), aux.subset(order[:n_val])


def last_within(accuracies: Sequence[float], acc_ratio: float) -> int:
    """Index of the last candidate before the first whose accuracy falls below ``(1 - acc_ratio) x
    accuracies[0]`` (candidate 0 is the unpruned model, so the answer is at least 0)."""
    floor = (1.0 - acc_ratio) * accuracies[0]
    chosen = 0
    for i, acc in enumerate(accuracies):
        if acc < floor:
            break
        chosen = i
    return chosen


def largest_within(accuracies: Sequence[float], acc_ratio: float) -> int:
    """Index of the last candidate whose accuracy is at least ``(1 - acc_ratio) x accuracies[0]``."""
    floor = (1.0 - acc_ratio) * accuracies[0]
    return max(i for i, acc in enumerate(accuracies) if acc >= floor)


def oracle_index(accuracies: Sequence[float], asrs: Sequence[float], acc_ratio: float) -> int:
    """The test-set ("oracle") choice we compare against, never used by a defense: the candidate with the lowest
    test ASR among those whose test accuracy is within ``acc_ratio`` of candidate 0's (the unpruned model's);
    ties go to the smaller amount."""
    floor = (1.0 - acc_ratio) * accuracies[0]
    ok = [i for i, acc in enumerate(accuracies) if acc >= floor]
    return min(ok, key=lambda i: (asrs[i], i))
