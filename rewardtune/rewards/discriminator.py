"""Reward `discriminator`: a learned density-ratio classifier as a reward, the GAIL-style counterpart of DxMI's energy
(the boosting thesis's f-divergence view, ../shared/papers/004; f-GAN, Nowozin et al. 2016).

A classifier's logit l(x) is trained every iteration by cross-entropy on data (label 1) against the sampler's samples
(label 0), so at its optimum l = log p_data / q_sampler. To minimise an f-divergence D_f(P || Q) = E_Q[f(p / q)]
over the sampler Q, each sample's reward is minus the functional derivative of D_f in q at x,

    r(x) = f*(f'(u)) = u f'(u) - f(u),   u = exp(l(x)) ~ p / q,

(`f_divergences.py`): for the reverse KL (f = -log u, D_f = KL(Q || P)) r = l - 1, the log-ratio itself (GAIL's
reward: with the sampler's entropy it is what DxMI's -E / tau reward is, so keep the entropy temperature small); for
the KL (f = u log u, D_f = KL(P || Q)) r = p / q, which up-weights what the sampler under-covers; JS gives GAN's
-log(1 - D) up to constants. The reward is differentiable in x (DxDP's policy step back-propagates through it).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from rewardtune.f_divergences import (
    F_DIVERGENCES,
    FDivergence,
    get_f_divergence,
    ratio_from_logit,
)
from rewardtune.nets.mlp import TimeMLP
from rewardtune.nets.resnet import ResNetEnergy
from rewardtune.optim import GradStep
from rewardtune.rewards.base import Reward
from rewardtune.score_sde.discriminator import logistic_loss


def f_divergence_reward(divergence: FDivergence, logit: torch.Tensor) -> torch.Tensor:
    """r = f*(f'(u)) with u = exp(logit) (module docstring): [B] like `logit`."""
    u = ratio_from_logit(logit)
    return divergence.conjugate(divergence.f_prime(u))


class DiscriminatorReward(Reward):
    """r(x) = f*(f'(exp l(x))) with l a classifier of data against samples (module docstring).

    Args:
        network: x [B, ...] -> logits [B] (or [B, 1]).
        optimizer: its `GradStep`.
        divergence: the f-divergence the reward minimises.
    """

    name: ClassVar[str] = "discriminator"
    learns: ClassVar[bool] = True
    differentiable: ClassVar[bool] = True
    cost_label: ClassVar[str] = "cost -r(x) (white: low, data-like)"  # the toy heat map's colour bar

    def __init__(self, network: nn.Module, optimizer: GradStep, divergence: FDivergence) -> None:
        super().__init__()
        self.network, self.optimizer, self.divergence = network, optimizer, divergence

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """l(x) [B], log p_data / q_sampler at the classifier's optimum."""
        return self.network(x).view(-1)

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return f_divergence_reward(self.divergence, self.logit(x))

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """One cross-entropy step: data `real` [B, ...] labelled 1, samples `fake` [B', ...] labelled 0."""
        logits = self.logit(torch.cat([real, fake]))
        l_real, l_fake = logits[: real.shape[0]], logits[real.shape[0] :]
        loss = logistic_loss(l_real, l_fake)
        self.optimizer.step(loss)
        return {"discriminator/loss": loss.item(), "discriminator/real": l_real.mean().item(),
                "discriminator/fake": l_fake.mean().item()}

    def optimizers(self) -> list[GradStep]:
        return [self.optimizer]


def build_discriminator_reward(
    sample_shape: tuple[int, ...],
    /,
    *,
    divergence: Literal["kl", "reverse_kl", "js", "pearson", "squared_hellinger"] = "reverse_kl",
    network: Literal["mlp", "resnet"] = "mlp",
    hidden: int = 128,
    depth: int = 3,
    channels: int = 32,
    lr: float = 1e-3,
    grad_clip: float | None = None,
) -> DiscriminatorReward:
    """Reward `discriminator` (module docstring): an MLP classifier (vectors; `hidden`, `depth`) or the ResNet of the
    image energy (`channels`), Adam at `lr`.

    Raises:
        ValueError: an unknown divergence or network, "resnet" for vectors.
    """
    if divergence not in F_DIVERGENCES or divergence == "precision_recall":
        raise ValueError(f"unknown divergence {divergence!r}: expected one of "
                         f"{', '.join(k for k in F_DIVERGENCES if k != 'precision_recall')}")
    if network == "mlp":
        dim = 1
        for s in sample_shape:
            dim *= s
        net: nn.Module = TimeMLP(dim, 1, hidden=hidden, depth=depth, time_dim=0)
    elif network == "resnet":
        if len(sample_shape) != 3:
            raise ValueError(f"network \"resnet\" is for images [C, H, W]; the samples are {tuple(sample_shape)}")
        net = ResNetEnergy(sample_shape[0], channels)
    else:
        raise ValueError(f"unknown discriminator network {network!r}: expected \"mlp\" or \"resnet\"")
    return DiscriminatorReward(net, GradStep([(net.parameters(), lr)], grad_clip=grad_clip), get_f_divergence(divergence))
