"""NPD: Neural Polarizer.

Zhu, Wei, Zha, Wu, "Neural Polarizer: A Lightweight and Effective Backdoor Defense via Purifying Poisoned
Features" (NeurIPS 2023). A learnable linear layer (the polarizer) is inserted at an intermediate layer of the
frozen victim and trained on the clean auxiliary set so that it filters trigger features while passing benign
ones: the rest of the network never changes.

Our layer: a 1 x 1 convolution with bias (C -> C, initialised to the identity) on the output of a convolution
that a BatchNorm reads directly (``target_layer_name``; default the last such pair a trace finds, which is
BackdoorBench's ``layer4.1.conv1`` on PreActResNet-18 and the last conv block on the small CNN). Because the
BatchNorm stays in eval mode, the trained polarizer folds exactly into the network afterwards (``W' = P W``
for the convolution, the bias into the BatchNorm's running mean), so the purified model has the victim's
architecture and its state dict loads strictly in BackdoorBench.

Training (``epochs``, SGD, everything but the polarizer frozen, BatchNorm in eval mode, no augmentation). On
each batch, after ``warm_epochs`` of clean cross-entropy only, a PGD of ``inner_steps`` steps (size
``2 trigger_norm / inner_steps``; ``norm_type`` ball of ``trigger_norm`` in pixels, as BackdoorBench's npd.py,
whose perturbed input is ``normalize(clamp(denormalize(x) + eps, 0, 1))``; ``budget_space: normalized`` measures
it in normalised units instead, as this package did until 2026-12-07) finds
perturbations x' that the *polarized* model misclassifies; the victim's most likely wrong class on x' is
taken as the estimated backdoor target t (targeted adversarial examples stand in for the unknown trigger).
Our reading of BackdoorBench's four weights:

    lmd1 * CE(h(x), y)                      keep clean accuracy
  + lmd2 * CE(h(x'), y)                     classify the perturbed sample correctly
  + lmd3 * -log(1 - p_t(h(x')))             move it away from the estimated target t
  + lmd4 * -log(1 - p_s(h(x')))             and away from the polarized model's own top wrong class s

BackdoorBench's defaults: 50 epochs of batch 128, lr 0.01 cosine, lmd 1 / 0.4 / 0.4 / 0.4, L2 norm 3.0,
2 inner steps, 5 warm epochs (tiny: lmd2 1.0, lmd3 = lmd4 = 0.1, norm 6.0, no warm-up).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_range
from ..data.imageset import Batch
from ..registry import DEFENSES
from ..utils.runtime import autocast, to_device
from ..utils.norms import project
from ._common import (BudgetSpace, NormType, ascent_step, bare_net, input_scale, keep_valid, perturb_pixels,
                      trace_layers)
from .base import Defense, DefenseConfig, Run


@dataclass
class NPDConfig(DefenseConfig):
    epochs: int = 50
    batch_size: int = 128
    warm_epochs: int = 5  # epochs of clean cross-entropy only, before the adversarial terms
    inner_steps: int = 2  # PGD steps per batch
    # the loss weights (module docstring): clean CE, adversarial CE, away from the target, away from the own top class
    lmd1: float = 1.0
    lmd2: float = 0.4
    lmd3: float = 0.4
    lmd4: float = 0.4
    norm_type: NormType = "L2"  # the perturbation ball
    trigger_norm: float = 3.0
    budget_space: BudgetSpace = "pixel"  # BackdoorBench's: trigger_norm in [0, 1] pixels (module docstring)
    target_layer_name: str | None = None  # None: the last conv that a BatchNorm reads directly

    def validate(self) -> None:
        super().validate()
        for key, low in (("warm_epochs", 0), ("inner_steps", 1), ("lmd1", 0), ("lmd2", 0), ("lmd3", 0), ("lmd4", 0)):
            check_range(self, key, low)
        check_range(self, "trigger_norm", 0, lo_open=True)


def polarizer_layer(net: torch.nn.Module, shape: tuple[int, ...], name: str | None) -> tuple[str, str]:
    """(conv, batchnorm) names where the polarizer goes."""
    pairs = trace_layers(net, shape)[0]
    if not pairs:
        raise ValueError(f"{type(net).__name__} has no convolution read directly by a BatchNorm2d; NPD needs one")
    if name is None:
        return pairs[-1]
    for conv, bn in pairs:
        if conv == name:
            return conv, bn
    raise ValueError(f"target_layer_name {name!r} is not a convolution read directly by a BatchNorm2d; "
                     f"candidates: {', '.join(c for c, _ in pairs)}")


def suppress(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``mean(-log(1 - p_cls))``: small when class ``cls`` is unlikely."""
    p = logits.float().softmax(1).gather(1, cls.view(-1, 1)).squeeze(1)
    return -torch.log((1.0 - p).clamp_min(1e-6)).mean()


def top_wrong(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.float().scatter(1, y.view(-1, 1), float("-inf")).argmax(1)


@torch.no_grad()
def fold_polarizer(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, polarizer: torch.nn.Conv2d) -> None:
    """Fold ``bn(polarizer(conv(x)))`` into ``conv`` and ``bn`` (exact while ``bn`` uses running statistics)."""
    P = polarizer.weight.detach().flatten(1).to(conv.weight.dtype)  # C x C
    conv.weight.copy_((P @ conv.weight.flatten(1)).view_as(conv.weight))
    b = polarizer.bias.detach().to(conv.weight.dtype)
    if conv.bias is not None:
        conv.bias.copy_(P @ conv.bias + b)
    else:
        bn.running_mean.sub_(b.to(bn.running_mean.dtype))


@DEFENSES.register("npd", aliases=["neural-polarizer"])
class NPD(Defense):
    """Neural polarizer: a linear layer trained against targeted adversarial perturbations (Zhu et al. 2023)."""

    config_class = NPDConfig
    augment = False

    def setup(self, run: Run) -> None:
        net = bare_net(run.net)
        conv_name, bn_name = polarizer_layer(net, run.aux.shape, self.config.target_layer_name)
        run.conv, run.bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
        if not run.bn.track_running_stats:
            raise ValueError(f"{bn_name} keeps no running statistics; the polarizer could not be folded into it")
        run.reference = self.copy_model(run.net, run.device).eval()  # the victim, for the target estimate
        for p in run.net.parameters():
            p.requires_grad_(False)
        c = run.conv.out_channels
        run.polarizer = torch.nn.Conv2d(c, c, 1, bias=True).to(run.conv.weight.device)
        with torch.no_grad():
            run.polarizer.weight.copy_(torch.eye(c).view(c, c, 1, 1))
            run.polarizer.bias.zero_()
        run.hook = run.conv.register_forward_hook(lambda _m, _i, out: run.polarizer(out))
        run.scale = input_scale(run.net, self.config.budget_space, run.device)
        run.layer = conv_name

    def parameters(self, run: Run):
        return run.polarizer.parameters()

    @property
    def train_mode(self) -> bool:
        return False

    def start_epoch(self, run: Run, epoch: int) -> None:
        run.epoch = epoch

    def adversarial(self, run: Run, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        radius, step = cfg.trigger_norm, 2.0 * cfg.trigger_norm / cfg.inner_steps
        delta = torch.zeros_like(x, dtype=torch.float32)
        for _ in range(cfg.inner_steps):
            delta.requires_grad_(True)
            with autocast(run.device, cfg.amp):
                loss = F.cross_entropy(net(perturb_pixels(x, delta, run.scale)).float(), y)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = ascent_step(delta.detach(), grad, cfg.norm_type, step)
                delta = keep_valid(x, project(delta, cfg.norm_type, radius), run.scale)
        return perturb_pixels(x, delta.detach(), run.scale).detach()

    def step(self, run: Run, net: torch.nn.Module, batch: Batch):
        cfg = self.config
        x, y = to_device(batch.x, run.device), batch.y
        with autocast(run.device, cfg.amp):
            logits = net(x)
        loss = cfg.lmd1 * F.cross_entropy(logits.float(), y)
        if run.epoch >= cfg.warm_epochs and (cfg.lmd2 or cfg.lmd3 or cfg.lmd4):
            x_adv = self.adversarial(run, net, x, y)
            with torch.no_grad(), autocast(run.device, cfg.amp):
                target = top_wrong(run.reference(x_adv), y)
            with autocast(run.device, cfg.amp):
                adv = net(x_adv)
            loss = loss + cfg.lmd2 * F.cross_entropy(adv.float(), y) + cfg.lmd3 * suppress(adv, target)
            loss = loss + cfg.lmd4 * suppress(adv, top_wrong(adv.detach(), y))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        return loss.detach(), logits.detach()

    def finish(self, run: Run) -> dict:
        run.hook.remove()
        fold_polarizer(run.conv, run.bn, run.polarizer)
        for p in run.net.parameters():
            p.requires_grad_(True)
        return {"layer": run.layer, "polarizer": run.polarizer.weight.detach().flatten(1).cpu()}
