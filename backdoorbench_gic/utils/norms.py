"""Per-sample norms and the projection onto a norm ball: one definition for every bounded perturbation in the package
(GIC's calibrators, the adversarial perturbations of SAU, i-BAU and NPD). A norm may be named either way:
BackdoorBench's ``L_inf`` / ``L2`` (the defenses' ``norm_type`` key) or GIC's ``linf`` / ``l2`` (its ``norm`` key)."""
from __future__ import annotations

import torch

_KINDS = {"l_inf": "linf", "linf": "linf", "l2": "l2"}


def norm_kind(norm: str) -> str:
    """``"linf"`` or ``"l2"`` for either spelling; anything else is an error naming the accepted ones."""
    try:
        return _KINDS[str(norm).lower()]
    except KeyError:
        raise ValueError(f"unknown norm {norm!r}: use L_inf or L2 (linf or l2)") from None


def flat_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm over all but the first dimension, in float32."""
    flat = t.reshape(t.shape[0], -1).float()
    return flat.abs().amax(1) if norm_kind(norm) == "linf" else flat.norm(dim=1)


def project(t: torch.Tensor, norm: str, radius: float) -> torch.Tensor:
    """Each sample of ``t`` projected onto the closed ``norm`` ball of ``radius``: clamped coordinate-wise for
    L-infinity, scaled down to the radius (never up) for L2."""
    if norm_kind(norm) == "linf":
        return t.clamp(-radius, radius)
    factor = (radius / flat_norm(t, "l2").clamp_min(1e-12)).clamp(max=1.0)
    return t * factor.view(-1, *([1] * (t.dim() - 1)))
