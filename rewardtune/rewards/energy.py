"""Reward `energy`: a learned energy-based model E_theta(x), reward = -E (DxMI paper, Sec. 3.2).

EBM update (Algorithm 1, line 4):

    min_theta  mean E(x_data) - mean E(x_T) + gamma (mean E(x_data)^2 + mean E(x_T)^2).

With `share_with_value` the energy is the value network evaluated at t = T (V^T = E), as in the paper's 2D and image
experiments; then the energy and the value share parameters and one optimiser.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rewardtune.nets.mlp import TimeMLP
from rewardtune.nets.value import ValueFunction
from rewardtune.optim import GradStep
from rewardtune.rewards.base import Reward


class ValueAtTime(nn.Module):
    """E(x) = V(x, T): exposes a value function at its terminal time as an energy."""

    def __init__(self, value: ValueFunction, time: int) -> None:
        super().__init__()
        self.value = value
        self.time = time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x, torch.full((x.shape[0],), self.time, dtype=torch.long, device=x.device))


def ebm_loss(e_real: torch.Tensor, e_fake: torch.Tensor, gamma: float) -> torch.Tensor:
    """The contrastive EBM loss with squared-energy regularisation (Algorithm 1, line 4)."""
    return e_real.mean() - e_fake.mean() + gamma * (e_real.pow(2).mean() + e_fake.pow(2).mean())


class EnergyReward(Reward):
    """r(x) = -E_theta(x), trained against the sampler.

    Args:
        energy: module mapping x [B, ...] to energies [B] (or [B, 1]).
        optimizer: the `GradStep` that trains `energy` (shared with the value when they share a network).
        gamma: weight of the squared-energy regulariser.
    """

    name: ClassVar[str] = "energy"
    learns: ClassVar[bool] = True
    differentiable: ClassVar[bool] = True

    def __init__(self, energy: nn.Module, optimizer: GradStep, *, gamma: float = 1.0) -> None:
        super().__init__()
        self.energy = energy
        self.optimizer = optimizer
        self.gamma = gamma

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return -self.energy(x).view(-1)

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        energies = self.energy(torch.cat([real, fake])).view(-1)
        e_real, e_fake = energies[: real.shape[0]], energies[real.shape[0] :]
        loss = ebm_loss(e_real, e_fake, self.gamma)
        self.optimizer.step(loss)
        return {
            "energy/loss": loss.item(),
            "energy/real": e_real.mean().item(),
            "energy/fake": e_fake.mean().item(),
        }

    def optimizers(self) -> list[GradStep]:
        return [self.optimizer]

    def shares_value(self, value: nn.Module) -> bool:
        """Whether this energy is `value` at its terminal time (then V(., T) = E needs no regression of its own)."""
        return isinstance(self.energy, ValueAtTime) and self.energy.value is value


def build_energy_reward(
    sample_shape: tuple[int, ...],
    value: ValueFunction | None,
    num_steps: int,
    /,
    *,
    share_with_value: bool = True,
    gamma: float = 1.0,
    lr: float | None = None,
    hidden: int | None = None,
    depth: int | None = None,
    grad_clip: float | None = None,
) -> EnergyReward:
    """The DxMI energy.

    Shared (the paper's choice): E(x) = V(x, T), trained by the value's optimiser; the network and its learning
    rate are the [value] section's, so `lr`, `hidden`, `depth` and `grad_clip` are refused here. Otherwise a
    separate MLP E(x) (defaults: lr 1e-3, hidden 128, depth 3).
    """
    if share_with_value:
        if value is None:
            raise ValueError("share_with_value = true needs a [value] section")
        own = [k for k, v in {"lr": lr, "hidden": hidden, "depth": depth, "grad_clip": grad_clip}.items() if v is not None]
        if own:
            raise ValueError(f"{own[0]} belongs to the [value] section when share_with_value = true")
        return EnergyReward(ValueAtTime(value, num_steps), value.optimizer, gamma=gamma)
    dim = 1
    for s in sample_shape:
        dim *= s
    energy = TimeMLP(dim, 1, hidden=hidden or 128, depth=depth or 3, time_dim=0)
    optimizer = GradStep([(energy.parameters(), 1e-3 if lr is None else lr)], grad_clip=grad_clip)
    return EnergyReward(energy, optimizer, gamma=gamma)
