"""Optimizers, schedulers and the epoch loop that attacks and defenses share (a loop over batches that calls one
training step; the plain cross-entropy step is :func:`supervised_step`).

Optimizer and scheduler names follow BackdoorBench's keys (``client_optimizer``: sgd / adam / adamw /
adadelta; ``lr_scheduler``: CosineAnnealingLR / StepLR / MultiStepLR / ReduceLROnPlateau / none). One
deliberate difference: BackdoorBench's CosineAnnealingLR uses ``T_max = 100`` whatever the epoch count
unless ``cos_t_max`` is set; we use ``T_max = epochs`` (the schedule then decays to zero at the end of the
run as intended) and honour ``cos_t_max`` when given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .data.imageset import Batch, ImageSet
from .utils.logs import progress_enabled
from .utils.progress import progress_bar
from .utils.runtime import autocast, to_device


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any, name: str | None = None) -> torch.optim.Optimizer:
    """From a config with BackdoorBench keys: client_optimizer (or ``name``), lr, sgd_momentum, wd, adam_betas."""
    name = str(name or getattr(cfg, "client_optimizer", "sgd")).lower()
    lr, wd = float(cfg.lr), float(getattr(cfg, "wd", 0.0))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(getattr(cfg, "sgd_momentum", 0.9)), weight_decay=wd)
    betas = tuple(getattr(cfg, "adam_betas", (0.9, 0.999)))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=wd)
    raise ValueError(f"unknown client_optimizer {name!r}: use sgd, adam, adamw or adadelta")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, epochs: int | None = None):
    """Stepped once per epoch (ReduceLROnPlateau with the epoch's training loss)."""
    name = str(getattr(cfg, "lr_scheduler", None) or "none").lower()
    epochs = int(epochs if epochs is not None else cfg.epochs)
    if name in ("none", ""):
        return None
    if name == "cosineannealinglr":
        t_max = getattr(cfg, "cos_t_max", None) or max(epochs, 1)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(t_max))
    if name == "steplr":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(cfg.steplr_stepsize), gamma=float(cfg.steplr_gamma))
    if name == "multisteplr":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.steplr_milestones),
                                                    gamma=float(cfg.steplr_gamma))
    if name == "reducelronplateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    raise ValueError(f"unknown lr_scheduler {name!r}")


def step_scheduler(scheduler, loss: float | None = None) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(loss if loss is not None else 0.0)
    else:
        scheduler.step()


@dataclass
class EpochStats:
    loss: float  # mean over batches ("train_epoch_loss_avg_over_batch")
    acc: float  # training accuracy over samples
    n: int

    def as_row(self) -> dict[str, float]:
        return {"train_epoch_loss_avg_over_batch": self.loss, "train_acc": self.acc}


Step = Callable[[torch.nn.Module, Batch], tuple[Any, torch.Tensor]]
"""One training step: ``step(model, batch) -> (loss, logits)`` updates the model on one batch and returns the
batch's loss (a number or a 0-d tensor) and logits (detached), from which :func:`train_epoch` keeps its
statistics."""


def supervised_step(optimizer: torch.optim.Optimizer, *, device: torch.device, amp: bool = True,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Step:
    """The plain step: forward, ``loss_fn(logits, y)`` (cross-entropy by default), backward, ``optimizer.step()``."""
    loss_fn = loss_fn or F.cross_entropy

    def step(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_device(batch.x, device)
        with autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits.float(), batch.y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), logits.detach()

    return step


def train_epoch(
    model: torch.nn.Module,
    data: ImageSet,
    step: Step | torch.optim.Optimizer,
    *,
    device: torch.device,
    batch_size: int,
    generator: torch.Generator,
    augment: Callable | None = None,
    amp: bool = True,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_hook: Callable | None = None,
    train_mode: bool = True,
    progress: bool | None = None,
    desc: str = "train",
) -> EpochStats:
    """One pass over ``data`` (shuffled by ``generator``), calling ``step(model, batch)`` on every batch.

    ``step`` is a :data:`Step`, or an optimizer, for which the plain cross-entropy step is used (``loss_fn``
    and ``amp`` configure it). ``batch_hook(batch) -> batch`` can rewrite a batch before the step (on-the-fly
    poisoning). The model is put in train mode (``train_mode`` False: eval mode, BatchNorm statistics frozen)
    before the first batch.
    """
    if isinstance(step, torch.optim.Optimizer):
        step = supervised_step(step, device=device, amp=amp, loss_fn=loss_fn)
    model.train(train_mode)
    total_loss, batches, correct, seen = 0.0, 0, 0, 0
    it = data.batches(batch_size, shuffle=True, generator=generator, augment=augment, device=device)
    n_batches = (len(data) + batch_size - 1) // batch_size
    for batch in progress_bar(it, total=n_batches, desc=desc, leave=False, disable=not progress_enabled(progress)):
        if batch_hook is not None:
            batch = batch_hook(batch)
        loss, logits = step(model, batch)
        total_loss += float(loss)
        batches += 1
        correct += int((logits.argmax(1) == batch.y).sum())
        seen += len(batch.y)
    return EpochStats(total_loss / max(batches, 1), correct / max(seen, 1), seen)
