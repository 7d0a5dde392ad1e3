"""Algorithm `flow_matching`: conditional flow-matching pretraining of a `flow` backbone (rectified flow; Lipman et
al. 2023, Liu et al. 2023; SD3's logit-normal level sampling, Esser et al. 2024).

    s ~ p(s),  eps ~ N(0, I),  x_s = (1 - s) x_0 + s eps,  L = ||v_theta(x_s, s, c) - (eps - x_0)||^2 / D,

with p(s) uniform on [0, 1] or logit-normal (s = sigmoid(m + std * u), u ~ N(0, 1)). Only the velocity network is
trained; it needs no rollout. Conditional: as `ddpm`, each data point's own condition, dropped with probability
`p_uncond` for classifier-free guidance.
"""

from __future__ import annotations

from typing import Literal

import torch

from rewardtune.algorithms.ddpm import DenoisingPretrain
from rewardtune.backbones.flow import FlowChainPolicy
from rewardtune.conditions import Conditions


def sample_levels(
    n: int, generator: torch.Generator | None, device, *, kind: str = "uniform", mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """n noise levels s in (0, 1): uniform, or logit-normal sigmoid(mean + std u). [n]"""
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown level sampling {kind!r}: expected 'uniform' or 'logit_normal'")


def flow_matching_loss(
    backbone: FlowChainPolicy,
    x0: torch.Tensor,
    generator: torch.Generator | None,
    condition: Conditions | None = None,
    *,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The flow-matching loss (mean over batch and dimensions) of data x0 [B, ...] at noise levels `levels` [B]
    (default: uniform draws), on the unguided network (CFG scale 1)."""
    n = x0.shape[0]
    s = sample_levels(n, generator, x0.device) if levels is None else levels
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    view = s.view(-1, *([1] * (x0.dim() - 1)))
    x_s = (1 - view) * x0 + view * noise
    return (backbone.predict_velocity(x_s, s, condition, cfg_scale=1.0) - (noise - x0)).pow(2).mean()


class FlowMatchingPretrain(DenoisingPretrain):
    """Trains `backbone.velocity_net` with the flow-matching loss (`flow_matching_loss`)."""

    name = "flow_matching"

    def __init__(
        self,
        backbone: FlowChainPolicy,
        *,
        lr: float = 1e-3,
        grad_clip: float | None = None,
        p_uncond: float = 0.0,
        level_sampling: Literal["uniform", "logit_normal"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        if not isinstance(backbone, FlowChainPolicy):
            raise TypeError(f"algorithm 'flow_matching' needs a flow backbone, got {type(backbone).__name__}")
        if level_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown level_sampling {level_sampling!r}: expected 'uniform' or 'logit_normal'")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        super().__init__(backbone, lr=lr, grad_clip=grad_clip, p_uncond=p_uncond)
        self.level_sampling, self.logit_mean, self.logit_std = level_sampling, logit_mean, logit_std

    def loss(self, x0: torch.Tensor, generator, condition: Conditions | None) -> torch.Tensor:
        s = sample_levels(x0.shape[0], generator, x0.device, kind=self.level_sampling, mean=self.logit_mean,
                          std=self.logit_std)
        return flow_matching_loss(self.backbone, x0, generator, condition, levels=s)


def build_flow_matching(
    backbone: FlowChainPolicy,
    /,
    *,
    lr: float = 1e-3,
    grad_clip: float | None = None,
    p_uncond: float = 0.0,
    level_sampling: Literal["uniform", "logit_normal"] = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> FlowMatchingPretrain:
    """Algorithm `flow_matching` (`level_sampling`: how training draws s; "logit_normal" is SD3's, with
    `logit_mean` and `logit_std`; `p_uncond`: the probability of training a data point without its condition)."""
    return FlowMatchingPretrain(backbone, lr=lr, grad_clip=grad_clip, p_uncond=p_uncond, level_sampling=level_sampling,
                                logit_mean=logit_mean, logit_std=logit_std)
