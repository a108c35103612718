"""CLP: data-free backdoor removal by Channel Lipschitzness-based Pruning.

Zheng, Zhang, Wang, Zhao, Cheng, "Data-free Backdoor Removal based on Channel Lipschitzness" (ECCV 2022).
A trigger works by driving a few channels to abnormally large outputs; such channels are unusually sensitive
to their input. CLP bounds each channel's Lipschitz constant from its weights alone and prunes, layer by
layer, the channels whose bound is an outlier. It uses no data at all: the reference a user with poor
auxiliary data should compare against (the auxiliary set it is handed is ignored).

For output channel k of a convolution with kernel ``W_k`` (C_in x kh x kw, reshaped to C_in x kh*kw), the upper
bound is the spectral norm ``||W_k||_2``, times ``|gamma_k| / sqrt(var_k + eps)`` when a BatchNorm reads the
convolution's output directly (found by a trace, :func:`~._common.trace_layers`; a residual sum in between
leaves the convolution's own bound). Within each layer the channels with bound above ``mean + u * std`` are
pruned: their kernel (and bias) is zeroed, and their BatchNorm's weight and bias, so the channel outputs zero.
Every convolution of the network is examined. BackdoorBench's default ``u`` is 3 (it sweeps u_min..u_max by
test ASR; we do not). Nothing is trained, so no training key applies; ``epochs`` is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_range
from ..data.imageset import ImageSet
from ..registry import DEFENSES
from ._common import bare_net, trace_layers
from .base import Defense, DefenseConfig, Monitor, PurifyResult, history_row, refuse_unused


@dataclass
class CLPConfig(DefenseConfig):
    epochs: int | None = None  # refused: CLP trains nothing
    u: float = 3.0

    def validate(self) -> None:
        super().validate()
        refuse_unused(self, "epochs", "u", "CLP prunes from the weights and trains nothing")
        check_range(self, "u", 0)


@torch.no_grad()
def channel_lipschitz(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None) -> torch.Tensor:
    """Upper bound of each output channel's Lipschitz constant (float32, one value per channel)."""
    w = conv.weight.detach().float()
    if conv.groups != 1:
        w = w.flatten(1).unsqueeze(1)  # grouped/depthwise: each channel reads its own group
    bound = torch.linalg.matrix_norm(w.flatten(2), ord=2)
    if bn is not None:
        bound = bound * (bn.weight.detach().float().abs() / torch.sqrt(bn.running_var.float() + bn.eps))
    return bound


@DEFENSES.register("clp", aliases=["channel-lipschitzness-pruning"])
class CLP(Defense):
    """Data-free pruning of channels with outlying Lipschitz upper bounds (Zheng et al., ECCV 2022)."""

    config_class = CLPConfig
    augment = False

    def purify(self, model: torch.nn.Module, aux: ImageSet, *, device: torch.device, train_augment=None,
               monitor: Monitor | None = None, progress: bool | None = None) -> PurifyResult:
        run = self.start(model, aux, device=device, progress=progress)
        net = bare_net(run.net)
        reads = dict(trace_layers(net, aux.shape)[0])  # conv name -> the BatchNorm reading it
        pruned: dict[str, list[int]] = {}
        with torch.no_grad():
            for name, conv in net.named_modules():
                if not isinstance(conv, torch.nn.Conv2d) or conv.out_channels < 2:
                    continue
                bn = net.get_submodule(reads[name]) if name in reads else None
                bound = channel_lipschitz(conv, bn)
                idx = torch.nonzero(bound > bound.mean() + self.config.u * bound.std()).flatten()
                if len(idx) == 0:
                    continue
                conv.weight[idx] = 0
                if conv.bias is not None:
                    conv.bias[idx] = 0
                if bn is not None and bn.affine:
                    bn.weight[idx] = 0
                    bn.bias[idx] = 0
                pruned[name] = idx.tolist()
        run.net.eval()
        n = sum(len(v) for v in pruned.values())
        history = [history_row(0, float("nan"), float("nan"), run.net, monitor)]
        return PurifyResult(run.net, history, {"pruned": pruned, "n_pruned": n})
