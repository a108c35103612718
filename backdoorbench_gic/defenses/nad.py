"""NAD: Neural Attention Distillation.

Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural
Networks" (ICLR 2021). A *teacher* is the victim fine-tuned on the clean auxiliary set for ``te_epochs``; the
*student*, a fresh copy of the victim, is then trained for ``epochs`` on the same data with cross-entropy plus
an attention-distillation term at several stages of the network:

    L = CE(student(x), y) + sum_i beta_i * mean( (A(F_i^s) - A(F_i^t))^2 ),
    A(F) = normalize( mean_c |F_c|^p )   (a spatial attention map: the channel mean of |activation|^p, flattened
                                          and scaled to unit L2 norm per sample)

with the teacher frozen. Stages (``stages``, names of modules of the bare network) default to the last three
spatial stages found by a trace (:func:`~._common.trace_layers`: the direct child called last at each feature
resolution; ``layer2``, ``layer3``, ``layer4`` for BackdoorBench's PreActResNet-18, as BackdoorBench uses);
``beta1``/``beta2``/``beta3`` weight them in that order (BackdoorBench 500, 1000, 1000; ``p`` 2).
BackdoorBench's other keys: te_epochs 10, epochs 100 (tiny 200), batch 256 (tiny 128), SGD lr 0.01 momentum 0.9,
weight decay 1e-4 (its ``momentum`` and ``weight_decay`` are read as sgd_momentum and wd), cosine; train
augmentation for both phases. The teacher's epochs are logged, its history kept in the extras.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import check_range, require
from ..data.imageset import Batch, ImageSet
from ..registry import DEFENSES
from ..utils.runtime import autocast, to_device
from ._common import bare_net, capture_outputs, trace_layers
from .base import Defense, DefenseConfig, Monitor, PurifyResult, Run


@dataclass
class NADConfig(DefenseConfig):
    KEY_ALIASES = {"momentum": "sgd_momentum", "weight_decay": "wd"}  # BackdoorBench nad's names

    epochs: int = 100
    wd: float = 1e-4
    te_epochs: int = 10
    beta1: float = 500.0
    beta2: float = 1000.0
    beta3: float = 1000.0
    p: float = 2.0
    stages: list[str] = field(default_factory=list)  # ours: empty = the last three traced stages

    def validate(self) -> None:
        super().validate()
        check_range(self, "te_epochs", 0)
        for key in ("beta1", "beta2", "beta3"):
            check_range(self, key, 0)
        check_range(self, "p", 0, lo_open=True)
        require(len(self.stages) in (0, 3), "stages", f"name three modules (one per beta), got {self.stages}")


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """``normalize(mean_c |F_c|^p)`` per sample, flattened (N x H*W), in float32."""
    a = feature.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(a, dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@DEFENSES.register("nad", aliases=["neural-attention-distillation"])
class NAD(Defense):
    """Neural attention distillation from a fine-tuned teacher (Li et al., ICLR 2021)."""

    config_class = NADConfig
    augment = True

    def stage_names(self, net: torch.nn.Module, shape: tuple[int, ...]) -> list[str]:
        if self.config.stages:
            for name in self.config.stages:
                net.get_submodule(name)  # an unknown name fails here, before any training
            return list(self.config.stages)
        stages = trace_layers(net, shape)[1]
        if len(stages) < 3:
            raise ValueError(f"{type(net).__name__} has {len(stages)} spatial stage(s) ({stages}); NAD needs three: "
                             "name them with the 'stages' key")
        return stages[-3:]

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device, train_augment=None,
               monitor: Monitor | None = None, progress: bool | None = None) -> PurifyResult:
        cfg = self.config
        run = self.start(model, aux, device=device, train_augment=train_augment, progress=progress)
        run.stages = self.stage_names(bare_net(run.net), aux.shape)
        run.teacher = None  # the first phase fine-tunes the teacher with the plain step
        teacher_history = self.train(run, cfg.te_epochs, name=f"{self.name} teacher")
        run.teacher = run.net.eval()
        for p in run.teacher.parameters():
            p.requires_grad_(False)
        run.net = self.copy_model(model, device)
        history = self.train(run, cfg.epochs, monitor)
        run.net.eval()
        return PurifyResult(run.net, history, {"stages": run.stages, "teacher_history": teacher_history})

    def step(self, run: Run, net: torch.nn.Module, batch: Batch):
        if run.teacher is None:
            return super().step(run, net, batch)
        cfg = self.config
        betas = (cfg.beta1, cfg.beta2, cfg.beta3)
        x, y = to_device(batch.x, run.device), batch.y
        with capture_outputs(bare_net(run.teacher), run.stages) as t_out, torch.no_grad(), \
                autocast(run.device, cfg.amp):
            run.teacher(x)
        with capture_outputs(bare_net(net), run.stages) as s_out, autocast(run.device, cfg.amp):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        for beta, name in zip(betas, run.stages):
            loss = loss + beta * attention_loss(s_out[name], t_out[name], cfg.p)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        return loss.detach(), logits.detach()
