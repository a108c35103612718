"""i-BAU: implicit backdoor adversarial unlearning.

Zeng, Chen, Park, Mao, Jin, Jia, "Adversarial Unlearning of Backdoors via Implicit Hypergradient" (ICLR 2022).
A trigger is a *universal* perturbation, so the defense solves the minimax

    min_theta  psi(theta) = H(delta*(theta), theta),   delta*(theta) = argmax_{||delta|| <= C} H(delta, theta),
    H(delta, theta) = mean_i CE(f_theta(x_i + delta), y_i)

on the clean auxiliary set. Solving inner and outer problems separately (unlearning a fixed UAP) is unstable;
i-BAU follows the *hypergradient* of psi instead. With the inner solver's fixed-point map
``Phi(delta, theta) = delta + a * grad_delta G(delta, theta)`` (one ascent step of size ``fp_lr`` on
``G = H - pert_reg * ||delta||^2``), the implicit function theorem gives

    grad psi = grad_theta H + (d_theta Phi)^T v,     v = (I - d_delta Phi)^T^{-1} grad_delta H,

and ``v`` is approximated by ``K`` fixed-point iterations ``v <- (d_delta Phi)^T v + grad_delta H`` from
``v = grad_delta H`` (K Hessian-vector products). ``(d_theta Phi)^T v = a * grad_theta <grad_delta G, v>`` is a
mixed second derivative, taken with double backward; nothing here is CUDA-specific.

Each round (``n_rounds``, BackdoorBench 5): (1) the inner step: ``inner_steps`` projected steepest-ascent steps
of length ``inner_lr`` on ``G`` over the whole auxiliary set (full-set gradients, BatchNorm in eval mode),
warm-started from the previous round's perturbation; (2) the outer step: one pass over the auxiliary set,
each batch updating ``theta`` (``optim`` Adam, lr 1e-4, wd 0; train augmentation as upstream BackdoorBench) with
the hypergradient at the current ``delta``. BatchNorm stays in eval mode throughout (``train_mode`` False, its
statistics frozen, its affine parameters trained), as in BackdoorBench's i-bau.py (``model.eval()`` before the
rounds and never ``train()``: upstream ``defense/i-bau.py:522``, BackdoorBenchER 528). Until 2026-12-08 ours ran
the outer step in train mode (``train_mode: true``).

Budget: BackdoorBench perturbs normalised tensors, so ``pert_norm`` is an L2 radius in normalised units over
the whole C x H x W perturbation (default 10; for 32 x 32 x 3 inputs an RMS of 0.18 normalised units, about
0.045 = 11/255 in CIFAR-10 pixels). The perturbation is applied to pixels as ``clamp(x + delta * std, 0, 1)``
(``budget_space: pixel``: ``std`` taken as 1, the radius in pixels).
Perturbation arithmetic and losses run in float32, only forward passes under autocast. ``pert_norm``,
``norm_type``, ``inner_steps``, ``inner_lr``, ``fp_lr``, ``pert_reg`` and ``budget_space`` are our keys
(BackdoorBench hard-codes the inner solver); the history's loss and accuracy are those of the outer step on
the perturbed batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_range
from ..data.imageset import Batch, ImageSet
from ..registry import DEFENSES
from ..utils.runtime import autocast, make_generator, to_device
from ..utils.norms import flat_norm, project
from ._common import BudgetSpace, NormType, RoundsConfig, RoundsDefense, ascent_step, input_scale, perturb_pixels
from .base import Run


@dataclass
class IBAUConfig(RoundsConfig):
    n_rounds: int = 5  # rounds of unlearning
    K: int = 5
    pert_norm: float = 10.0
    norm_type: NormType = "L2"
    inner_steps: int = 5
    inner_lr: float = 5.0
    fp_lr: float = 0.1
    pert_reg: float = 0.001
    budget_space: BudgetSpace = "normalized"

    def validate(self) -> None:
        super().validate()
        check_range(self, "K", 0)
        check_range(self, "pert_norm", 0, lo_open=True)
        check_range(self, "inner_steps", 0)
        check_range(self, "inner_lr", 0, lo_open=True)
        check_range(self, "fp_lr", 0, lo_open=True)
        check_range(self, "pert_reg", 0)


@DEFENSES.register("i-bau", aliases=["i_bau", "ibau"])
class IBAU(RoundsDefense):
    """Implicit backdoor adversarial unlearning: minimax over a universal perturbation (Zeng et al., ICLR 2022)."""

    config_class = IBAUConfig
    augment = True

    def universal_perturbation(self, model: torch.nn.Module, data: ImageSet, *, device: torch.device,
                               generator: torch.Generator | None = None, augment=None,
                               init: torch.Tensor | None = None) -> torch.Tensor:
        """The inner maximisation: a 1 x C x H x W perturbation in normalised units with norm <= ``pert_norm``
        that maximises the mean loss of ``model`` over ``data`` (minus ``pert_reg * ||delta||^2``)."""
        cfg = self.config
        generator = generator if generator is not None else make_generator(cfg.random_seed)
        scale = input_scale(model, cfg.budget_space, device)
        delta = torch.zeros((1, *data.shape), device=device) if init is None else init.detach().float().to(device)
        was_training = model.training
        model.eval()
        try:
            for _ in range(cfg.inner_steps):
                grad, n = torch.zeros_like(delta), 0
                for batch in data.batches(cfg.batch_size, shuffle=True, generator=generator, augment=augment,
                                          device=device):
                    x = to_device(batch.x, device)
                    d = delta.clone().requires_grad_(True)
                    with autocast(device, cfg.amp):
                        logits = model(perturb_pixels(x, d, scale))
                    loss = F.cross_entropy(logits.float(), batch.y, reduction="sum")
                    grad += torch.autograd.grad(loss, d)[0]
                    n += len(batch.y)
                with torch.no_grad():
                    grad = grad / max(n, 1) - 2.0 * cfg.pert_reg * delta
                    delta = project(ascent_step(delta, grad, cfg.norm_type, cfg.inner_lr), cfg.norm_type, cfg.pert_norm)
        finally:
            model.train(was_training)
        return delta.detach()

    def hypergradient_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                           y: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor,
                           device: torch.device) -> tuple[float, torch.Tensor]:
        """One outer update of ``model`` along the implicit hypergradient; returns (loss, logits)."""
        cfg = self.config
        d = delta.detach().clone().requires_grad_(True)
        with autocast(device, cfg.amp):
            logits = model(perturb_pixels(x, d, scale))
        loss = F.cross_entropy(logits.float(), y)  # H on this batch: the outer objective
        inner = loss - cfg.pert_reg * d.pow(2).sum()  # G: the inner objective
        (g,) = torch.autograd.grad(inner, d, create_graph=True)  # grad_delta G, differentiable
        b = (g + 2.0 * cfg.pert_reg * d).detach()  # grad_delta H
        v = b.clone()
        for _ in range(cfg.K):
            (hv,) = torch.autograd.grad(g, d, grad_outputs=v, retain_graph=True)  # Hessian_delta(G) v
            v = (v + cfg.fp_lr * hv + b).detach()
        total = loss + cfg.fp_lr * (g * v).sum()  # grad_theta of this = grad_theta H + (d_theta Phi)^T v
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        d.grad = None
        optimizer.step()
        return float(loss.detach()), logits.detach()

    def setup(self, run: Run) -> None:
        run.scale = input_scale(run.net, self.config.budget_space, run.device)
        run.delta = None

    def start_epoch(self, run: Run, epoch: int) -> None:
        """The inner step, warm-started from the previous round's perturbation."""
        run.delta = self.universal_perturbation(run.net, run.aux, device=run.device, generator=run.generator,
                                                augment=run.augment, init=run.delta)

    def step(self, run: Run, net: torch.nn.Module, batch: Batch):
        return self.hypergradient_step(net, run.optimizer, to_device(batch.x, run.device), batch.y, run.delta,
                                       run.scale, run.device)

    def end_epoch(self, run: Run, epoch: int, stats) -> str:
        return f"||delta|| {float(flat_norm(run.delta, self.config.norm_type)[0]):.3f} (loss and acc on x + delta)"

    def finish(self, run: Run) -> dict:
        return {"perturbation": None if run.delta is None else run.delta.cpu()}
