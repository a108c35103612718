"""FP: Fine-Pruning.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks"
(RAID 2018). Backdoor behaviour hides in neurons of the last convolutional layer that clean inputs leave
dormant. FP (1) measures each channel's mean activation on clean data, (2) prunes channels in increasing
order of activation until clean accuracy drops too far, then (3) fine-tunes the pruned network, with the
pruned channels held at zero.

Which channels: those of the last feature map, i.e. the features the classification head reads (BackdoorBench
prunes the output channels of PreActResNet's ``layer4``; on our small CNN the last conv block's). The feature map
is average-pooled and read only by the head, so pruning channel c is exactly zeroing column c of the head's
weight: that works on any network whose head :func:`~backdoorbench_gic.models.head_of` finds, keeps the
architecture (the state dict loads strictly in BackdoorBench), and every candidate amount is evaluated from the
pooled features computed once. The pruned columns are re-zeroed after every fine-tuning step, so they stay zero.

How much: chosen from the auxiliary set only (see :mod:`._pruning`): activations are measured on the fit part,
channels are pruned ``once_prune_ratio`` of them at a time, and the last amount whose held-out accuracy is
within ``acc_ratio`` of the unpruned model's is kept (``prune_ratio`` fixes the fraction instead). Then
``epochs`` of fine-tuning on the whole auxiliary set (cross-entropy, SGD, train augmentation as BackdoorBench).
BackdoorBench's defaults: acc_ratio 0.1, once_prune_ratio 0.01, 100 epochs of batch 256, lr 0.01, cosine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import check_range
from ..data.imageset import Batch, ImageSet
from ..evaluation import predict_logits
from ..registry import DEFENSES
from ._common import classifier_head
from ._pruning import PruningPlan, check_holdout_keys, holdout, last_within
from .base import Defense, DefenseConfig, Monitor, PurifyResult, Run


@dataclass
class FPConfig(DefenseConfig):
    epochs: int = 100
    acc_ratio: float = 0.1  # tolerated relative drop of held-out accuracy while pruning
    once_prune_ratio: float = 0.01  # fraction of the channels pruned per candidate
    val_ratio: float = 0.2  # ours: the held-out fraction of the auxiliary set that picks the amount
    prune_ratio: float | None = None  # ours: a fixed fraction to prune (None: chosen on the held-out part)

    def validate(self) -> None:
        super().validate()
        check_holdout_keys(self)
        check_range(self, "once_prune_ratio", 0, 1, lo_open=True)
        check_range(self, "prune_ratio", 0, 1)


@torch.no_grad()
def head_features(model: torch.nn.Module, data: ImageSet, device: torch.device, batch_size: int = 512
                  ) -> torch.Tensor:
    """The classification head's input for every sample of ``data`` (float32, CPU)."""
    head = classifier_head(model)
    feats = []
    handle = head.register_forward_pre_hook(lambda _m, inputs: feats.append(inputs[0].detach().float().cpu()))
    try:
        predict_logits(model, data, device, batch_size)
    finally:
        handle.remove()
    return torch.cat(feats) if feats else torch.empty(0)


def candidate_counts(n_channels: int, once_prune_ratio: float) -> list[int]:
    """0, s, 2s, ... channels (s = ceil(once_prune_ratio x n)), never all of them."""
    step = max(1, math.ceil(once_prune_ratio * n_channels))
    return list(range(0, n_channels, step))


@torch.no_grad()
def pruned_head_predictions(features: torch.Tensor, head: torch.nn.Linear, order: torch.Tensor, count: int
                            ) -> torch.Tensor:
    """Predicted classes with the first ``count`` channels of ``order`` pruned (their head columns zeroed)."""
    w = head.weight.detach().float().cpu().clone()
    w[:, order[:count]] = 0
    b = head.bias.detach().float().cpu() if head.bias is not None else 0
    return (features @ w.T + b).argmax(1)


@DEFENSES.register("fp", aliases=["fine-pruning"])
class FP(Defense):
    """Fine-pruning: prune the last layer's dormant channels, then fine-tune (Liu et al., RAID 2018)."""

    config_class = FPConfig
    augment = True

    def plan(self, run: Run) -> PruningPlan:
        """Rank the channels on the fit part and try every candidate amount on the held-out part."""
        cfg = self.config
        fit, held = holdout(run.aux, cfg.val_ratio, run.generator)
        head = classifier_head(run.net)
        activation = head_features(run.net, fit, run.device).mean(0)
        order = torch.argsort(activation, stable=True)  # dormant first
        counts = candidate_counts(len(order), cfg.once_prune_ratio)
        held_feats = head_features(run.net, held, run.device)
        accs = [float((pruned_head_predictions(held_feats, head, order, k) == held.labels).float().mean())
                for k in counts]
        if cfg.prune_ratio is None:
            chosen = counts[last_within(accs, cfg.acc_ratio)]
        else:
            chosen = min(int(round(cfg.prune_ratio * len(order))), len(order) - 1)
        return PruningPlan(order, counts, accs, chosen, {"activation": activation})

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device, train_augment=None,
               monitor: Monitor | None = None, progress: bool | None = None) -> PurifyResult:
        run = self.start(model, aux, device=device, train_augment=train_augment, progress=progress)
        plan = self.plan(run)
        run.head = classifier_head(run.net)
        run.keep = torch.ones(len(plan.ranking), dtype=torch.bool, device=run.head.weight.device)
        run.keep[plan.ranking[:plan.chosen].to(run.keep.device)] = False
        self.apply_mask(run)
        history = self.train(run, self.config.epochs, monitor)
        run.net.eval()
        n = len(plan.ranking)
        extras = {"pruned_channels": plan.ranking[:plan.chosen].tolist(), "n_channels": n, "prune_ratio": plan.chosen / n,
                  "holdout_acc": dict(zip(plan.candidates, plan.holdout_acc)), "activation": plan.info["activation"]}
        return PurifyResult(run.net, history, extras)

    @torch.no_grad()
    def pruned_copy(self, model: torch.nn.Module, plan: PruningPlan, count: int, device: torch.device
                    ) -> torch.nn.Module:
        """A copy of ``model`` with the first ``count`` channels of the plan pruned, not fine-tuned."""
        net = self.copy_model(model, device)
        classifier_head(net).weight[:, plan.ranking[:count].to(device)] = 0
        return net.eval()

    @torch.no_grad()
    def apply_mask(self, run: Run) -> None:
        run.head.weight.mul_(run.keep.to(run.head.weight.dtype))

    def step(self, run: Run, net: torch.nn.Module, batch: Batch):
        out = super().step(run, net, batch)
        self.apply_mask(run)
        return out
