"""Reward `energy`: a learned energy-based model E_theta(x), reward = -E (DxMI paper, Sec. 3.2).

EBM update (Algorithm 1, line 4):

    min_theta  mean E(x_data) - mean E(x_T) + gamma (mean E(x_data)^2 + mean E(x_T)^2).

With `share_with_value` the energy is the value network evaluated at t = T (V^T = E), as in the paper's 2D and image
experiments; then the energy and the value share parameters and one optimiser.

Conditional DxMI (a class-conditional EBM learned from labelled data): E(x, c), with the reward's `context` as c. The
update contrasts data with their own conditions against samples with theirs:
mean E(x_data, c_data) - mean E(x_T, c) + gamma (...); with conditions drawn from the data's label frequencies the
two sides see the same distribution of c.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from rewardtune.conditions import Conditions
from rewardtune.nets.conditioning import Conditioning
from rewardtune.nets.mlp import TimeMLP
from rewardtune.nets.resnet import ResNetEnergy
from rewardtune.nets.value import ValueFunction
from rewardtune.optim import GradStep
from rewardtune.rewards.base import Reward


class ValueAtTime(nn.Module):
    """E(x, c) = V(x, T, c): exposes a value function at its terminal time as an energy."""

    def __init__(self, value: ValueFunction, time: int) -> None:
        super().__init__()
        self.value = value
        self.time = time

    def forward(self, x: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        times = torch.full((x.shape[0],), self.time, dtype=torch.long, device=x.device)
        return self.value(x, times) if condition is None else self.value(x, times, condition)


def ebm_loss(e_real: torch.Tensor, e_fake: torch.Tensor, gamma: float) -> torch.Tensor:
    """The contrastive EBM loss with squared-energy regularisation (Algorithm 1, line 4)."""
    return e_real.mean() - e_fake.mean() + gamma * (e_real.pow(2).mean() + e_fake.pow(2).mean())


class EnergyReward(Reward):
    """r(x, c) = -E_theta(x, c), trained against the sampler.

    Args:
        energy: module mapping x [B, ...] (and, when conditional, `Conditions` of B rows) to energies [B] (or [B, 1]).
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

    def forward(self, x: torch.Tensor, context: Conditions | None = None) -> torch.Tensor:
        return -self.energy_of(x, context)

    def energy_of(self, x: torch.Tensor, condition: Conditions | None) -> torch.Tensor:
        """E(x) or E(x, c): [B]."""
        return (self.energy(x) if condition is None else self.energy(x, condition)).view(-1)

    def update(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        real_condition: Conditions | None = None,
        fake_condition: Conditions | None = None,
    ) -> dict[str, torch.Tensor]:
        """One step of the EBM loss on data `real` [B, ...] and samples `fake` [B', ...], each with its conditions
        (both or neither)."""
        if (real_condition is None) != (fake_condition is None):
            raise ValueError("a conditional energy needs the conditions of the data and of the samples")
        condition = None if real_condition is None else Conditions.cat([real_condition, fake_condition.to(real.device)])
        energies = self.energy_of(torch.cat([real, fake]), condition)
        e_real, e_fake = energies[: real.shape[0]], energies[real.shape[0] :]
        loss = ebm_loss(e_real, e_fake, self.gamma)
        self.optimizer.step(loss)
        return {  # 0-d tensors: the trainer reads every metric of an iteration in one copy
            "energy/loss": loss.detach(),
            "energy/real": e_real.detach().mean(),
            "energy/fake": e_fake.detach().mean(),
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
    conditioning: Conditioning | None = None,
    /,
    *,
    share_with_value: bool = True,
    gamma: float = 1.0,
    network: Literal["mlp", "resnet"] = "mlp",
    lr: float | None = None,
    hidden: int | None = None,
    depth: int | None = None,
    channels: int | None = None,
    grad_clip: float | None = None,
) -> EnergyReward:
    """The DxMI energy.

    Shared (the paper's choice): E(x) = V(x, T), trained by the value's optimiser; the network and its learning
    rate are the [value] section's, so `network`, `lr`, `hidden`, `depth`, `channels` and `grad_clip` are refused
    here. Otherwise a network of its own (default learning rate 1e-3): `network = "mlp"` (an MLP on the flattened
    sample: `hidden` 128, `depth` 3) or `"resnet"` (images [C, H, W]: the ResNet energy of `nets.resnet` with
    `channels` 32). A separate energy is what a composite reward needs (a learned energy beside an external reward,
    whose terminal cost the value learns).

    Raises:
        ValueError: an option of the other network or of the shared value, or "resnet" for non-image samples.
    """
    own = {"lr": lr, "hidden": hidden, "depth": depth, "channels": channels, "grad_clip": grad_clip}
    if share_with_value:
        if value is None:
            raise ValueError("share_with_value = true needs a [value] section")
        given = [k for k, v in own.items() if v is not None] + (["network"] if network != "mlp" else [])
        if given:
            raise ValueError(f"{given[0]} belongs to the [value] section when share_with_value = true")
        return EnergyReward(ValueAtTime(value, num_steps), value.optimizer, gamma=gamma)
    net = separate_energy_network(sample_shape, conditioning, network, hidden=hidden, depth=depth, channels=channels)
    lr = 1e-3 if lr is None else lr
    if conditioning is not None:  # E(x, c) through the value interface, which passes the condition to the network
        value_net = ValueFunction(net, lr=lr, time_dependent=False, grad_clip=grad_clip, conditioning=conditioning)
        return EnergyReward(ValueAtTime(value_net, 0), value_net.optimizer, gamma=gamma)
    optimizer = GradStep([(net.parameters(), lr)], grad_clip=grad_clip)
    return EnergyReward(net, optimizer, gamma=gamma)


def separate_energy_network(
    sample_shape: tuple[int, ...],
    conditioning: Conditioning | None,
    network: str,
    *,
    hidden: int | None,
    depth: int | None,
    channels: int | None,
) -> nn.Module:
    """The network of an energy that does not share the value's: x [B, ...] (and c) -> [B]."""
    if network == "mlp":
        if channels is not None:
            raise ValueError("channels is an option of network = \"resnet\"; the MLP energy takes hidden and depth")
        dim = 1
        for s in sample_shape:
            dim *= s
        return TimeMLP(dim, 1, hidden=hidden or 128, depth=depth or 3, time_dim=0, conditioning=conditioning)
    if network == "resnet":
        if hidden is not None or depth is not None:
            raise ValueError("hidden and depth are options of network = \"mlp\"; the ResNet energy takes channels")
        if len(sample_shape) != 3:
            raise ValueError(f"network = \"resnet\" needs images (C, H, W), got sample shape {tuple(sample_shape)}")
        return ResNetEnergy(sample_shape[0], channels or 32, conditioning)
    raise ValueError(f"unknown energy network {network!r}: expected 'mlp' or 'resnet'")
