"""Low-frequency trigger (Zeng et al., ICCV 2021, "Rethinking the backdoor attacks' triggers: a frequency
perspective"): a universal adversarial perturbation towards the target class, crafted against a clean model and
kept smooth by a low-pass filter, then used as an additive BadNets-style trigger (label-flipping data poisoning).

Crafting (our re-implementation of the paper's low-pass universal perturbation): starting from zero, ``craft_steps``
signed-gradient steps of size ``craft_lr`` lower the clean model's cross-entropy towards ``attack_target`` on
random batches of non-target training images; after every step the perturbation is clipped to ``[-eps, eps]`` and
low-pass filtered. The filter keeps the 2-D DFT coefficients whose integer frequencies satisfy
``|f_y| <= cutoff`` and ``|f_x| <= cutoff`` (a square window round the DC term) and zeroes the rest. The final
trigger is filtered once more and rescaled (never enlarged) to fit the bound, which leaves its spectrum inside the
window. Poisoned images are ``round(clip(x + 255 * trigger, 0, 255))``.

The clean model is a clean-model record's ``clean_model.pth`` (``surrogate_record``: a ``bbgic attack --attack
prototype`` folder under ``record/``, or a path) or, when unset, one trained here for ``surrogate_epochs`` with the
run's model and optimizer settings on the clean training set. ``trigger_path`` loads a finished trigger instead
(the ``lf_trigger.pt`` every record gets), so a trigger can be reused without crafting it again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import check_range
from ..data.imageset import ImageSet
from ..data.transforms import TrainAugment
from ..models import build_model, build_model_for_state_dict
from ..records import PoisonedSplit
from ..registry import ATTACKS
from ..training import make_optimizer, make_scheduler, step_scheduler, train_epoch
from ..utils.io import atomic_torch_save
from ..utils.runtime import prepare_model, resolve_device
from .base import Attack, AttackConfig
from .triggers import _to_uint8

log = logging.getLogger(__name__)

CRAFT_SEED_OFFSET = 27644437
TRIGGER_FILE = "lf_trigger.pt"


def frequency_window(height: int, width: int, cutoff: int) -> torch.Tensor:
    """Boolean H x W mask over the (unshifted) 2-D DFT: True where ``|f_y| <= cutoff`` and ``|f_x| <= cutoff``,
    with ``f`` the signed integer frequency (``torch.fft.fftfreq(n) * n``)."""
    fy = (torch.fft.fftfreq(height) * height).round().abs()
    fx = (torch.fft.fftfreq(width) * width).round().abs()
    return (fy[:, None] <= cutoff) & (fx[None, :] <= cutoff)


def low_pass(x: torch.Tensor, cutoff: int) -> torch.Tensor:
    """Zero every DFT coefficient of the last two dimensions outside :func:`frequency_window` (real in, real out;
    the window is symmetric under f -> -f, so the result stays real)."""
    h, w = x.shape[-2:]
    spec = torch.fft.fft2(x.double())
    spec = spec * frequency_window(h, w, cutoff).to(spec.device)
    return torch.fft.ifft2(spec).real.to(x.dtype)


def fit_bound(trigger: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale down (never up) so that ``max |trigger| <= eps``; scaling keeps the spectrum's support."""
    peak = float(trigger.abs().max())
    return trigger * (eps / peak) if peak > eps else trigger


def craft_low_frequency_trigger(model: torch.nn.Module, images: torch.Tensor, target: int, *, eps: float,
                                cutoff: int, steps: int, lr: float, batch_size: int, generator: torch.Generator,
                                device: torch.device | str = "cpu") -> torch.Tensor:
    """A universal C x H x W perturbation (on the [0,1] scale) that pushes ``model`` towards ``target`` on
    ``images`` (uint8 N x C x H x W, non-target samples), low-pass filtered to ``cutoff`` and bounded by ``eps``."""
    device = torch.device(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _, c, h, w = images.shape
    delta = torch.zeros(c, h, w, device=device)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)
        x = images[idx].to(device).float() / 255.0
        d = delta.clone().requires_grad_(True)
        logits = model((x + d).clamp(0, 1))
        loss = F.cross_entropy(logits, torch.full((len(x),), target, device=device))
        (grad,) = torch.autograd.grad(loss, d)
        with torch.no_grad():
            delta = low_pass((delta - lr * grad.sign()).clamp(-eps, eps), cutoff)
    return fit_bound(low_pass(delta, cutoff), eps).cpu()


@dataclass
class LowFrequencyConfig(AttackConfig):
    """``eps``: the trigger's L-inf bound on the [0,1] pixel scale (0.03, about 8 grey levels: chosen on held-out
    Fashion-MNIST training data, where 0.1 and 0.05 cost more clean accuracy); ``cutoff``: the highest integer DFT
    frequency kept per axis (of 14 at 28 px); the crafting keys; the clean model (``surrogate_record`` or
    ``surrogate_epochs``); ``trigger_path``: a finished trigger to reuse."""

    attack: str = "lf"
    eps: float = 0.03
    cutoff: int = 3
    craft_steps: int = 200
    craft_lr: float = 0.005
    craft_batch_size: int = 128
    surrogate_record: str | None = None
    surrogate_epochs: int = 3
    trigger_path: str | None = None

    def validate(self) -> None:
        super().validate()
        check_range(self, "eps", 0, 1, lo_open=True)
        check_range(self, "cutoff", 0)
        check_range(self, "craft_steps", 1)
        check_range(self, "craft_lr", 0, lo_open=True)
        check_range(self, "craft_batch_size", 1)
        check_range(self, "surrogate_epochs", 1)


@ATTACKS.register("lf", aliases=["lowfrequency", "low_frequency"])
class LowFrequency(Attack):
    """Low-frequency universal trigger, crafted against a clean model, added to pratio of the training set."""

    config_class = LowFrequencyConfig

    def prepare_trigger(self) -> None:
        self.trigger: torch.Tensor | None = None
        self.craft_seconds = 0.0
        if self.config.trigger_path:
            saved = torch.load(self.resolve_path("trigger_path"), map_location="cpu", weights_only=True)
            self.trigger = self._checked(saved["trigger"] if isinstance(saved, dict) else saved)

    def _checked(self, trigger: torch.Tensor) -> torch.Tensor:
        h, w, c = self.spec.input_shape
        if tuple(trigger.shape) != (c, h, w):
            raise ValueError(f"key 'trigger_path': the trigger is {tuple(trigger.shape)}, the dataset needs "
                             f"{(c, h, w)}")
        return trigger.float()

    def _clean_model(self, train: ImageSet, device: torch.device) -> torch.nn.Module:
        cfg = self.config
        k = self.num_classes
        if cfg.surrogate_record:
            p = Path(cfg.surrogate_record)
            candidates = [p] if p.is_absolute() else [self.bb_root / "record" / p, self.bb_root / p, Path.cwd() / p]
            found = next((c / "clean_model.pth" for c in candidates if (c / "clean_model.pth").is_file()), None)
            if found is None:
                raise FileNotFoundError(f"key 'surrogate_record': no clean_model.pth in "
                                        f"{', '.join(str(c) for c in candidates)}; run `bbgic attack --attack prototype` "
                                        "first, or leave surrogate_record unset to train a clean model here")
            state = torch.load(found, map_location="cpu", weights_only=True)
            model = build_model_for_state_dict(cfg.model, k, state, cfg.dataset)
            model.net.load_state_dict(state)
            log.info("lf: crafting against the clean model %s", found)
            return prepare_model(model, device)
        gen = torch.Generator().manual_seed(cfg.random_seed + CRAFT_SEED_OFFSET)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.random_seed + CRAFT_SEED_OFFSET)
        model = prepare_model(build_model(cfg.model, k, cfg.dataset, width=cfg.width), device)
        torch.random.set_rng_state(torch_state)
        opt = make_optimizer(model.parameters(), cfg)
        sched = make_scheduler(opt, cfg, epochs=cfg.surrogate_epochs)
        for epoch in range(cfg.surrogate_epochs):
            stats = train_epoch(model, train, opt, device=device, batch_size=cfg.batch_size, generator=gen,
                                augment=TrainAugment.for_spec(self.spec), amp=cfg.amp, progress=False,
                                desc=f"lf surrogate {epoch + 1}/{cfg.surrogate_epochs}")
            step_scheduler(sched, stats.loss)
            log.info("lf: clean surrogate epoch %d/%d, train acc %.4f", epoch + 1, cfg.surrogate_epochs, stats.acc)
        return model

    def craft(self, train: ImageSet) -> torch.Tensor:
        """Craft (once) the trigger against the clean model, from the non-target training images."""
        self._ensure_setup()
        if self.trigger is None:
            cfg = self.config
            t0 = time.time()
            device = resolve_device(cfg.device)
            model = self._clean_model(train, device)
            pool = train.images[train.labels != cfg.attack_target]
            gen = torch.Generator().manual_seed(cfg.random_seed + CRAFT_SEED_OFFSET + 1)
            self.trigger = craft_low_frequency_trigger(
                model, pool, cfg.attack_target, eps=cfg.eps, cutoff=cfg.cutoff, steps=cfg.craft_steps,
                lr=cfg.craft_lr, batch_size=cfg.craft_batch_size, generator=gen, device=device)
            self.craft_seconds = time.time() - t0
            log.info("lf: crafted the trigger in %.1fs (max |trigger| %.4f of eps %.4f, cutoff %d)",
                     self.craft_seconds, float(self.trigger.abs().max()), cfg.eps, cfg.cutoff)
        return self.trigger

    def apply_trigger(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if self.trigger is None:
            raise RuntimeError("the low-frequency trigger is crafted from the training set: call poison_train (or "
                               "craft) first, or set trigger_path")
        return _to_uint8(images.double() + 255.0 * self.trigger.double().unsqueeze(0))

    def poison_train(self, train: ImageSet) -> tuple[ImageSet, PoisonedSplit | None]:
        self.craft(train)
        return super().poison_train(train)

    def write_extras(self, record_dir: Path, record_name: str, test: ImageSet) -> list[Path]:
        """``lf_trigger.pt``: the trigger (C x H x W, [0,1] scale) and how it was made."""
        cfg = self.config
        path = record_dir / TRIGGER_FILE
        atomic_torch_save({"trigger": self.trigger.contiguous(), "eps": cfg.eps, "cutoff": cfg.cutoff,
                           "craft_steps": cfg.craft_steps, "craft_lr": cfg.craft_lr}, path)
        return [path]

    def load_extras(self, record_dir) -> "LowFrequency":
        self._ensure_setup()
        saved = torch.load(Path(record_dir) / TRIGGER_FILE, map_location="cpu", weights_only=True)
        self.trigger = self._checked(saved["trigger"])
        return self
