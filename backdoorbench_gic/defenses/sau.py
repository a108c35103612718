"""SAU: shared adversarial unlearning.

Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial
Examples" (NeurIPS 2023, arXiv 2307.10562). The paper bounds the backdoor risk of the purified model
``h_theta`` by its risk on *shared adversarial examples* (SAEs): perturbed inputs ``x~ = x + eps`` that the
purified model and the frozen backdoored model ``h_bd`` both send to the *same wrong* class. Poisoned inputs
are such examples as long as both models keep the backdoor, so unlearning SAEs removes it. SAU solves the
resulting bi-level problem by alternating PGD (inner, generate SAEs) and a model update (outer, unlearn them)
on each batch of the clean auxiliary set.

Relaxation of the indicator ``1[h_theta(x~) = h_bd(x~) != y]`` (p, q: the two models' softmax outputs):

    s(x~) = max_{k != y} min(p_k(x~), q_k(x~))          L_share(x~) = -log(1 - s(x~))

Terms and BackdoorBench keys. The paper weights four terms with lambda_1..lambda_4 (lambda_3 = 0.01, the others
1); BackdoorBench names them beta_1 (0.01), beta_2, lmd_1, lmd_3 and adds lmd_2, a vanilla adversarial-training
term that is off by default. Which paper symbol each key carries is our reading of the two:

- inner maximisation over ``eps`` with ||eps|| <= ``trigger_norm`` (``norm_type``, default L_inf 0.2),
  ``adv_steps`` PGD steps of size ``adv_lr`` from ``pgd_init`` (``max``: a random vertex of the ball):
      ``beta_2`` * L_share(x~)                                 (find shared adversarial examples; 1)
    + ``beta_1`` * [CE(h_theta(x~), y) + CE(h_bd(x~), y)]       (plain adversarial loss of both models, which
                                                                  gives the ascent a direction while the two
                                                                  models share no wrong class yet; 0.01)
- outer minimisation over ``theta`` (``outer_steps`` optimizer steps per batch, Adam lr 1e-4):
      ``lmd_1`` * CE(h_theta(x), y)                             (clean accuracy; 1)
    + ``lmd_2`` * CE(h_theta(x~), y)                            (vanilla adversarial training; 0, off)
    + ``lmd_3`` * L_share(x~) with h_bd fixed                   (unlearn the shared examples; 1)

``train_mode`` False (BackdoorBench's default) keeps BatchNorm in eval mode throughout (statistics frozen,
affine parameters still trained). No augmentation (BackdoorBench feeds sau the test transform).

Budget space: BackdoorBench's sau.py perturbs *pixels*: its perturbed input is ``normalize(denormalize(x) +
eps)`` (upstream f02e353 ``defense/sau.py:428-431``, BackdoorBenchER the same), so ``trigger_norm`` 0.2 is 0.2
in [0, 1] pixel units whatever the dataset's normalisation. That is our default (``budget_space: pixel``);
``normalized`` reads ``trigger_norm`` and ``adv_lr`` in normalised units (``0.2 * std_c`` pixels: about 4x
smaller on CIFAR-10), which is what this package did until 2026-12-07 (every SAU result in BENCHMARKS.md before
then; issue 25's parity run found it: ASR 100 % left against their 0 % on the same record, 0 % once fixed).
One difference stays by default: we clamp the perturbed image to [0, 1] (a valid image), they do not (their
clamp is commented out, ``sau.py:183-185``); ``clamp_images: false`` reproduces theirs.
The PGD arithmetic and all losses run in float32; only the forward passes use autocast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import check_range
from ..data.imageset import Batch
from ..registry import DEFENSES
from ..utils.runtime import autocast, make_generator, to_device
from ..utils.norms import project
from ._common import (BudgetSpace, NormType, RoundsConfig, RoundsDefense, ascent_step, init_delta, input_scale,
                      keep_valid, perturb_pixels)
from .base import Run


@dataclass
class SAUConfig(RoundsConfig):
    n_rounds: int = 100  # rounds over the auxiliary set
    outer_steps: int = 1
    lmd_1: float = 1.0
    lmd_2: float = 0.0
    lmd_3: float = 1.0
    beta_1: float = 0.01
    beta_2: float = 1.0
    trigger_norm: float = 0.2
    norm_type: NormType = "L_inf"
    adv_lr: float = 0.2
    adv_steps: int = 5
    pgd_init: Literal["max", "random", "zero"] = "max"
    train_mode: bool = False
    budget_space: BudgetSpace = "pixel"  # BackdoorBench's: see the module docstring
    clamp_images: bool = True  # ours: perturbed images stay in [0, 1]; False leaves them unclamped, as their sau.py

    def validate(self) -> None:
        super().validate()
        check_range(self, "outer_steps", 1)
        for key in ("lmd_1", "lmd_2", "lmd_3", "beta_1", "beta_2"):
            check_range(self, key, 0)
        check_range(self, "trigger_norm", 0, lo_open=True)
        check_range(self, "adv_lr", 0, lo_open=True)
        check_range(self, "adv_steps", 0)


def shared_probability(logits: torch.Tensor, ref_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``s = max_{k != y} min(p_k, q_k)``: soft degree to which both models agree on one wrong class."""
    p = logits.float().softmax(1)
    q = ref_logits.float().softmax(1)
    both = torch.minimum(p, q).scatter(1, y.view(-1, 1), -1.0)  # exclude the true class
    return both.amax(1)


def shared_loss(logits: torch.Tensor, ref_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean(-log(1 - s))``: large when both models confidently share a wrong prediction."""
    s = shared_probability(logits, ref_logits, y)
    return -torch.log((1.0 - s).clamp_min(1e-6)).mean()


@DEFENSES.register("sau", aliases=["shared-adversarial-unlearning"])
class SAU(RoundsDefense):
    """Shared adversarial unlearning (Wei et al., NeurIPS 2023)."""

    config_class = SAUConfig
    augment = False

    def shared_adversarial_examples(self, model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor,
                                    y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """PGD for shared adversarial examples of ``model`` and ``reference`` (pixels in [0,1], detached).

        The returned images differ from ``x`` by at most ``trigger_norm`` in ``norm_type``, measured in
        normalised units (``budget_space: normalized``: ``|x~ - x| / std``) or in pixels.
        """
        cfg = self.config
        generator = generator if generator is not None else make_generator(cfg.random_seed)
        x = x.float()
        scale = input_scale(model, cfg.budget_space, x.device)
        clamp = cfg.clamp_images  # False: BackdoorBench's arithmetic, x + eps may leave [0, 1]
        was_training = model.training
        model.eval()
        try:
            delta = init_delta(tuple(x.shape), cfg.pgd_init, cfg.norm_type, cfg.trigger_norm, generator, x.device)
            delta = keep_valid(x, project(delta, cfg.norm_type, cfg.trigger_norm), scale, clamp)
            for _ in range(cfg.adv_steps):
                delta.requires_grad_(True)
                x_adv = perturb_pixels(x, delta, scale, clamp)
                with autocast(x.device, cfg.amp):
                    logits, ref = model(x_adv), reference(x_adv)
                objective = cfg.beta_2 * shared_loss(logits, ref, y)
                if cfg.beta_1:
                    objective = objective + cfg.beta_1 * (F.cross_entropy(logits.float(), y)
                                                          + F.cross_entropy(ref.float(), y))
                (grad,) = torch.autograd.grad(objective, delta)
                with torch.no_grad():
                    delta = ascent_step(delta.detach(), grad, cfg.norm_type, cfg.adv_lr)
                    delta = keep_valid(x, project(delta, cfg.norm_type, cfg.trigger_norm), scale, clamp)
        finally:
            model.train(was_training)
        return perturb_pixels(x, delta.detach(), scale, clamp).detach()

    def setup(self, run: Run) -> None:
        run.reference = self.copy_model(run.net, run.device).eval()  # the frozen backdoored model h_bd
        for p in run.reference.parameters():
            p.requires_grad_(False)
        run.shared, run.shared_rates = 0, []

    @property
    def train_mode(self) -> bool:
        return self.config.train_mode

    def step(self, run: Run, net: torch.nn.Module, batch: Batch):
        """Generate shared adversarial examples of the batch, then ``outer_steps`` updates that unlearn them."""
        cfg, device = self.config, run.device
        x, y = to_device(batch.x, device), batch.y
        x_adv = self.shared_adversarial_examples(net, run.reference, x, y, run.generator)
        with torch.no_grad(), autocast(device, cfg.amp):
            ref_adv = run.reference(x_adv).float()
        for step in range(cfg.outer_steps):
            with autocast(device, cfg.amp):
                logits = net(x) if cfg.lmd_1 or step == 0 else None
                logits_adv = net(x_adv) if (cfg.lmd_2 or cfg.lmd_3) else None
            loss = torch.zeros((), device=device)
            if cfg.lmd_1:
                loss = loss + cfg.lmd_1 * F.cross_entropy(logits.float(), y)
            if cfg.lmd_2:
                loss = loss + cfg.lmd_2 * F.cross_entropy(logits_adv.float(), y)
            if cfg.lmd_3:
                loss = loss + cfg.lmd_3 * shared_loss(logits_adv, ref_adv, y)
            if step == 0:
                first = loss.detach(), logits.detach()
                if logits_adv is not None:
                    pa = logits_adv.detach().argmax(1)
                    run.shared += int(((pa == ref_adv.argmax(1)) & (pa != y)).sum())
            if loss.requires_grad:
                run.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                run.optimizer.step()
        return first

    def end_epoch(self, run: Run, epoch: int, stats) -> str:
        run.shared_rates.append(run.shared / max(stats.n, 1))
        run.shared = 0
        return f"shared adversarial rate {run.shared_rates[-1]:.3f}"

    def finish(self, run: Run) -> dict:
        return {"shared_adversarial_rate": run.shared_rates}
