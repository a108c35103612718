"""ANP: Adversarial Neuron Pruning.

Wu & Wang, "Adversarial Neuron Perturbation Exposes Backdoors in Pretrained Models" (NeurIPS 2021). Neurons
that carry a backdoor are the ones whose small perturbation collapses the clean-data behaviour. ANP learns a
mask ``m_k`` in [0, 1] per neuron that keeps the network accurate *under* an adversarial multiplicative
perturbation of every neuron, then prunes the neurons with small masks.

Neurons are the channels of every BatchNorm2d layer (BackdoorBench's choice; any network with BatchNorm works).
For channel k with BatchNorm output ``o_k = gamma_k * z_k + beta_k``, the perturbed output is

    (m_k + delta_k) * gamma_k * z_k + (1 + xi_k) * beta_k,      |delta_k|, |xi_k| <= anp_eps,

applied through forward hooks (the network's weights never change while masks are learnt). Each of ``nb_iter``
iterations takes a batch of the fit part of the auxiliary set, draws delta and xi uniformly in the box, takes
``anp_steps`` signed ascent steps of size ``anp_eps / anp_steps`` on the cross-entropy, then updates the masks
(SGD, ``lr``, momentum 0.9) on

    anp_alpha * CE(clean, masks) + (1 - anp_alpha) * CE(perturbed, masks),

clipping them to [0, 1]. The masks are learnt on a copy in train mode, so BatchNorm normalises with batch
statistics as in the authors' training (in eval mode the perturbations of all neurons compound through the
frozen statistics, and on a small CNN every mask collapsed to 0 with 10 % clean accuracy). Pruning sets
``gamma_k = 0`` (the channel then outputs its bias, as the paper's pruned neuron does); nothing is fine-tuned.

How much: ``pruning_by: threshold`` prunes every neuron with mask below t for t = 0, ``pruning_step``, ...,
``pruning_max``; ``number`` prunes the k smallest masks for k = 0, step, ... (step and max as neuron counts,
or fractions of all neurons when below 1). Of these candidates the rule of :mod:`._pruning` keeps the largest
one whose accuracy on the held-out part of the auxiliary set is within ``acc_ratio`` of the unpruned
model's (BackdoorBench picks it with test ASR; ``pruning_amount`` fixes it instead). BackdoorBench's defaults:
nb_iter 2000, batch 256, lr 0.2, anp_eps 0.4, anp_steps 1, anp_alpha 0.2, threshold up to 0.9 in steps of 0.05.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from ..utils.progress import progress_bar

from ..config import check_range, require
from ..data.imageset import ImageSet
from ..evaluation import predict_logits
from ..registry import DEFENSES
from ..utils.logs import progress_enabled
from ..utils.runtime import autocast, to_device
from ._common import bare_net
from ._pruning import PruningPlan, check_holdout_keys, holdout, largest_within
from .base import Defense, DefenseConfig, Monitor, PurifyResult, Run, history_row, refuse_unused


@dataclass
class ANPConfig(DefenseConfig):
    lr: float = 0.2  # the masks' learning rate
    lr_scheduler: str | None = "none"
    epochs: int | None = None  # refused: ANP counts nb_iter
    nb_iter: int = 2000
    anp_eps: float = 0.4
    anp_steps: int = 1
    anp_alpha: float = 0.2
    pruning_by: Literal["threshold", "number"] = "threshold"
    pruning_max: float = 0.90
    pruning_step: float = 0.05
    acc_ratio: float = 0.1
    val_ratio: float = 0.2  # ours: the held-out fraction of the auxiliary set that picks the amount
    pruning_amount: float | None = None  # ours: a fixed threshold / number (None: chosen on the held-out part)

    def validate(self) -> None:
        super().validate()
        refuse_unused(self, "epochs", "nb_iter", "ANP learns its masks for nb_iter iterations")
        check_holdout_keys(self)
        check_range(self, "nb_iter", 0)
        check_range(self, "anp_eps", 0)
        check_range(self, "anp_steps", 1)
        check_range(self, "anp_alpha", 0, 1)
        check_range(self, "pruning_step", 0, lo_open=True)
        check_range(self, "pruning_max", 0)
        check_range(self, "pruning_amount", 0)
        if self.pruning_by == "threshold":
            require(self.pruning_max <= 1, "pruning_max", f"a mask threshold must be <= 1, got {self.pruning_max}")


class NeuronPerturbation:
    """Masks and perturbations on the channels of every BatchNorm2d of a network, through forward hooks."""

    def __init__(self, net: torch.nn.Module):
        self.layers = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and m.affine]
        if not self.layers:
            raise ValueError(f"{type(net).__name__} has no BatchNorm2d layer: ANP has no neurons to mask")
        dev = self.layers[0][1].weight.device
        self.masks = [torch.ones(m.num_features, device=dev, requires_grad=True) for _, m in self.layers]
        self.delta = [torch.zeros(m.num_features, device=dev) for _, m in self.layers]
        self.xi = [torch.zeros(m.num_features, device=dev) for _, m in self.layers]
        self.perturb = False
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, _inputs, out):
            beta = module.bias.view(1, -1, 1, 1)
            mask = self.masks[i].view(1, -1, 1, 1)
            if not self.perturb:
                return mask * (out - beta) + beta
            d, x = self.delta[i].view(1, -1, 1, 1), self.xi[i].view(1, -1, 1, 1)
            return (mask + d) * (out - beta) + (1 + x) * beta
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def values(self) -> torch.Tensor:
        return torch.cat([m.detach().flatten() for m in self.masks])


@DEFENSES.register("anp", aliases=["adversarial-neuron-pruning"])
class ANP(Defense):
    """Adversarial neuron pruning: masks learnt under neuron perturbation, small masks pruned (Wu & Wang 2021)."""

    config_class = ANPConfig
    augment = False
    epochs_key = "nb_iter"

    def learn_masks(self, net: torch.nn.Module, data: ImageSet, device: torch.device, generator: torch.Generator,
                    progress: bool | None = None) -> tuple[torch.Tensor, float, float]:
        """(mask values in [0, 1] over all neurons in module order, last iterations' loss and clean accuracy)."""
        cfg = self.config
        net.train()  # batch statistics, as the authors' mask training: the copy's running statistics are discarded
        for p in net.parameters():
            p.requires_grad_(False)
        nh = NeuronPerturbation(net)
        opt = torch.optim.SGD(nh.masks, lr=cfg.lr, momentum=0.9)
        it, total, correct, seen = iter(()), 0.0, 0, 0
        try:
            for _ in progress_bar(range(cfg.nb_iter), desc=f"{self.name} masks",
                                  disable=not progress_enabled(progress)):
                batch = next(it, None)
                if batch is None:  # a new shuffled pass over the data
                    it = data.batches(cfg.batch_size, shuffle=True, generator=generator, device=device)
                    batch = next(it)
                x, y = to_device(batch.x, device), batch.y
                if cfg.anp_eps > 0:
                    self._adversarial_perturbation(nh, net, x, y, generator, device)
                nh.perturb = False
                with autocast(device, cfg.amp):
                    logits = net(x)
                loss = cfg.anp_alpha * F.cross_entropy(logits.float(), y)
                if cfg.anp_alpha < 1:
                    nh.perturb = cfg.anp_eps > 0
                    with autocast(device, cfg.amp):
                        adv = net(x)
                    loss = loss + (1 - cfg.anp_alpha) * F.cross_entropy(adv.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m in nh.masks:
                        m.clamp_(0.0, 1.0)
                total += float(loss.detach())
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
        finally:
            nh.remove()
        return nh.values(), total / max(cfg.nb_iter, 1), correct / max(seen, 1)

    def _adversarial_perturbation(self, nh: NeuronPerturbation, net, x, y, generator, device) -> None:
        cfg = self.config
        eps, step = cfg.anp_eps, cfg.anp_eps / cfg.anp_steps
        for i in range(len(nh.layers)):
            n = nh.masks[i].numel()
            nh.delta[i] = ((torch.rand(n, generator=generator) * 2 - 1) * eps).to(device).requires_grad_(True)
            nh.xi[i] = ((torch.rand(n, generator=generator) * 2 - 1) * eps).to(device).requires_grad_(True)
        nh.perturb = True
        for _ in range(cfg.anp_steps):
            with autocast(device, cfg.amp):
                loss = F.cross_entropy(net(x).float(), y)
            grads = torch.autograd.grad(loss, nh.delta + nh.xi)
            k = len(nh.delta)
            with torch.no_grad():
                nh.delta = [(d + step * g.sign()).clamp(-eps, eps).requires_grad_(True)
                            for d, g in zip(nh.delta, grads[:k])]
                nh.xi = [(d + step * g.sign()).clamp(-eps, eps).requires_grad_(True) for d, g in zip(nh.xi, grads[k:])]
        nh.delta = [d.detach() for d in nh.delta]
        nh.xi = [d.detach() for d in nh.xi]

    def candidates(self, n_neurons: int) -> list[float]:
        """The pruning amounts tried, from none upwards (thresholds, or neuron counts)."""
        cfg = self.config
        if cfg.pruning_by == "threshold":
            steps = int(round(cfg.pruning_max / cfg.pruning_step))
            return [round(i * cfg.pruning_step, 10) for i in range(steps + 1)]
        scale = n_neurons if cfg.pruning_max <= 1 and cfg.pruning_step < 1 else 1
        step = max(1, int(round(cfg.pruning_step * scale)))
        top = min(int(round(cfg.pruning_max * scale)), n_neurons - 1)
        return list(range(0, top + 1, step))

    def pruned_set(self, masks: torch.Tensor, amount: float) -> torch.Tensor:
        """Indices (into the flat mask vector) of the neurons pruned at ``amount``."""
        if self.config.pruning_by == "threshold":
            return torch.nonzero(masks < amount).flatten()
        return torch.argsort(masks, stable=True)[:int(amount)]

    @staticmethod
    @torch.no_grad()
    def prune(net: torch.nn.Module, pruned: torch.Tensor) -> None:
        """``gamma = 0`` for the given flat neuron indices (BatchNorm2d layers in module order)."""
        start = 0
        for _, m in [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and m.affine]:
            sel = pruned[(pruned >= start) & (pruned < start + m.num_features)] - start
            m.weight[sel.to(m.weight.device)] = 0
            start += m.num_features

    def plan(self, run: Run) -> PruningPlan:
        """Learn the masks on the fit part (on a frozen copy) and try every candidate amount on the held-out part."""
        cfg = self.config
        fit, held = holdout(run.aux, cfg.val_ratio, run.generator)
        learner = self.copy_model(run.net, run.device)
        masks, loss, acc = self.learn_masks(learner, fit, run.device, run.generator, run.progress)
        amounts = self.candidates(len(masks))
        accs: list[float] = []
        if cfg.pruning_amount is None:
            for amount in amounts:
                trial = self.pruned_copy(run.net, masks, amount, run.device)
                accs.append(float((predict_logits(trial, held, run.device).argmax(1) == held.labels).float().mean()))
            chosen = amounts[largest_within(accs, cfg.acc_ratio)]
        else:
            chosen = cfg.pruning_amount
        return PruningPlan(masks, amounts, accs, chosen, {"loss": loss, "acc": acc})

    def pruned_copy(self, model: torch.nn.Module, plan: PruningPlan | torch.Tensor, amount: float,
                    device: torch.device) -> torch.nn.Module:
        """A copy of ``model`` with the neurons pruned at ``amount`` of the plan's (or the given) masks."""
        masks = plan.ranking if isinstance(plan, PruningPlan) else plan
        trial = self.copy_model(model, device)
        self.prune(bare_net(trial), self.pruned_set(masks, amount))
        return trial.eval()

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device, train_augment=None,
               monitor: Monitor | None = None, progress: bool | None = None) -> PurifyResult:
        run = self.start(model, aux, device=device, train_augment=train_augment, progress=progress)
        plan = self.plan(run)
        pruned = self.pruned_set(plan.ranking, plan.chosen)
        self.prune(bare_net(run.net), pruned)
        run.net.eval()
        history = [history_row(0, plan.info["loss"], plan.info["acc"], run.net, monitor)]
        extras = {"masks": plan.ranking.cpu(), "pruning_amount": plan.chosen, "n_pruned": len(pruned),
                  "n_neurons": len(plan.ranking), "holdout_acc": dict(zip(plan.candidates, plan.holdout_acc))}
        return PurifyResult(run.net, history, extras)
