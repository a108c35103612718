"""Pieces the purification defenses share: the classifier head, the rounds and outer optimizer of the adversarial
defenses (SAU, i-BAU), BatchNorm-statistics freezing, and norm-bounded perturbation arithmetic.

Perturbations (SAU's per-sample PGD, i-BAU's universal trigger) are measured in the units BackdoorBench's
script for that defense uses: i-BAU adds its trigger to *normalised* tensors (``budget_space: normalized``),
SAU perturbs pixels (``pixel``). Our inputs are pixels in [0,1] with the normalisation inside
:class:`~backdoorbench_gic.models.VictimModel`, so a perturbation ``d`` in normalised units is applied to pixels
as ``clamp(x + d * std, 0, 1)`` (``x_norm + d`` is exactly the normalised perturbed input) and one in pixels as
``clamp(x + d, 0, 1)`` (``std`` taken as 1); the clamp keeps the image valid (it can only shrink the
perturbation, so the bound still holds). All of this arithmetic runs in float32, outside autocast. Norms and
the projection onto a ball: :mod:`..utils.norms`.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..config import check_range, require
from ..models.wrapper import head_of
from ..training import make_optimizer
from ..utils.norms import flat_norm
from .base import Defense, DefenseConfig, Run, refuse_unused

log = logging.getLogger(__name__)

NormType = Literal["L_inf", "L2"]
BudgetSpace = Literal["normalized", "pixel"]


def classifier_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The final linear layer of a :class:`VictimModel` (``.head``) or of a bare network."""
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        return head
    net = getattr(model, "net", model)
    return head_of(net)[1]


OPTIMS = ("adam", "sgd", "adamw", "adadelta")


@dataclass
class RoundsConfig(DefenseConfig):
    """The keys SAU and i-BAU share (BackdoorBench's sau and i-bau): the outer optimizer is chosen with ``optim``
    (``client_optimizer`` is not used), Adam at a constant 1e-4 without weight decay; the passes over the auxiliary
    set are counted in ``n_rounds`` (``epochs`` is refused)."""

    lr: float = 1e-4
    wd: float = 0.0
    lr_scheduler: str | None = "none"  # BackdoorBench keeps Adam's rate constant
    optim: str = "Adam"  # the outer optimizer (BackdoorBench's key)
    n_rounds: int = 5
    epochs: int | None = None  # refused: counted in n_rounds
    train_mode: bool = False  # BackdoorBench's sau and i-bau: BatchNorm in eval mode throughout

    def validate(self) -> None:
        super().validate()
        require(self.optim.lower() in OPTIMS, "optim", f"must be one of Adam, SGD, AdamW, Adadelta, got {self.optim!r}")
        refuse_unused(self, "epochs", "n_rounds", "it counts its passes over the auxiliary set in rounds")
        check_range(self, "n_rounds", 0)


class RoundsDefense(Defense):
    """A defense configured by :class:`RoundsConfig`: rounds instead of epochs, the outer optimizer from ``optim``."""

    epochs_key: ClassVar[str] = "n_rounds"
    unit: ClassVar[str] = "round"

    def build_optimizer(self, run: Run) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(run), self.config, name=self.config.optim)

    @property
    def train_mode(self) -> bool:
        return self.config.train_mode


def input_scale(model: torch.nn.Module, budget_space: str, device: torch.device) -> torch.Tensor:
    """Pixel size of one normalised unit per channel (``std``, shape 1 x C x 1 x 1), or 1 in pixel space."""
    std = getattr(model, "std", None)
    if budget_space == "pixel" or std is None:
        if budget_space != "pixel":
            log.warning("model has no normalisation constants; measuring the perturbation budget in pixels")
        return torch.ones(1, 1, 1, 1, device=device)
    return std.detach().to(device=device, dtype=torch.float32)


def perturb_pixels(x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """``x`` (pixels) plus ``delta`` (in units of ``scale``), clamped to valid pixels unless ``clamp`` is False
    (BackdoorBench's SAU leaves them unclamped)."""
    out = x.float() + delta.float() * scale
    return out.clamp(0.0, 1.0) if clamp else out


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, norm_type: str, step: float) -> torch.Tensor:
    """Steepest ascent of length ``step`` in the given norm: sign step for L_inf, normalised gradient for L2."""
    if norm_type == "L_inf":
        return delta + step * grad.sign()
    norms = flat_norm(grad, "L2").clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return delta + step * grad / norms


def init_delta(shape: tuple[int, ...], how: str, norm_type: str, radius: float, generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """PGD start: ``zero``; ``random`` (uniform in the L_inf box / a random direction inside the L2 ball);
    ``max`` (a random point on the boundary: random signs times the radius for L_inf, a random direction at
    full length for L2)."""
    if how == "zero":
        return torch.zeros(shape, device=device)
    if norm_type == "L_inf":
        u = torch.rand(shape, generator=generator) * 2 - 1
        d = u.sign() * radius if how == "max" else u * radius
        return d.to(device)
    d = torch.randn(shape, generator=generator)
    d = d / flat_norm(d, "L2").clamp_min(1e-12).view(-1, *([1] * (d.dim() - 1))) * radius
    if how == "random":
        d = d * torch.rand(shape[0], generator=generator).view(-1, *([1] * (d.dim() - 1)))
    return d.to(device)


def keep_valid(x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Shrink a per-sample ``delta`` so that ``x + delta * scale`` lies in [0,1] (keeps PGD iterates honest);
    ``delta`` itself when ``clamp`` is False (images may leave the range)."""
    return (perturb_pixels(x, delta, scale) - x.float()) / scale if clamp else delta


@torch.no_grad()
def freeze_bn_stats(model: torch.nn.Module) -> list[tuple[torch.nn.modules.batchnorm._BatchNorm, float | None]]:
    """Stop BatchNorm running-statistics updates (for extra forward passes); returns what to restore."""
    saved = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            saved.append((m, m.momentum))
            m.momentum = 0.0
    return saved


def restore_bn_stats(saved) -> None:
    for m, momentum in saved:
        m.momentum = momentum


# ---------------------------------------------------------------------------------------------------------
# reaching layers of any network (the pruning and distillation defenses)
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def capture_outputs(net: torch.nn.Module, names: list[str]):
    """Within the block, ``outputs[name]`` holds the latest forward output of each named submodule."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_module, _inputs, out, name=name):
            outputs[name] = out
        handles.append(net.get_submodule(name).register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def trace_layers(net: torch.nn.Module, shape: tuple[int, ...]) -> tuple[list[tuple[str, str]], list[str]]:
    """One forward pass of a zero input of ``shape`` (C, H, W) through ``net`` (in eval mode, state untouched).

    Returns (pairs, stages): ``pairs`` are (conv, batchnorm) names where the BatchNorm2d reads exactly the
    Conv2d's output (a residual sum in between breaks the pair), in call order; ``stages`` are the direct
    children of ``net`` that were called last at each spatial resolution above 1 x 1, in call order (for
    BackdoorBench's PreActResNet: layer1 .. layer4).
    """
    names = {m: n for n, m in net.named_modules()}
    made_by: dict[int, tuple[torch.Tensor, str]] = {}  # holds the tensors, so no id is reused during the pass
    pairs: list[tuple[str, str]] = []
    last_at: dict[tuple[int, int], str] = {}
    children = {m for _, m in net.named_children()}
    handles = []

    def conv_hook(module, _inputs, out):
        made_by[id(out)] = (out, names[module])

    def bn_hook(module, inputs):
        hit = made_by.get(id(inputs[0]))
        if hit is not None and hit[0] is inputs[0]:
            pairs.append((hit[1], names[module]))

    def child_hook(module, _inputs, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
            key = tuple(out.shape[2:])
            last_at.pop(key, None)  # keep call order: re-insert at the end
            last_at[key] = names[module]

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook))
        if m in children:
            handles.append(m.register_forward_hook(child_hook))
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters())
        net(torch.zeros((1, *shape), device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return pairs, list(last_at.values())


def bare_net(model: torch.nn.Module) -> torch.nn.Module:
    """The network behind a :class:`VictimModel` (whose ``.net`` holds BackdoorBench's parameter names)."""
    return getattr(model, "net", model)
