"""Reward `time_energy`: DDAEBM's energy E_theta(x, k), one network shared over the diffusion levels k = 0..T.

DDAEBM ("Improving Adversarial Energy-Based Model via Diffusion Process", ../shared/papers/003) learns one energy
per noise level of a few-step forward process (backbones/schedules.py: `vp_sde_schedule`), with the paper's sign:
**p_theta(x_k) ∝ exp(+E_theta(x_k, k))**, so E is a log-density up to a constant (at the optimum E(., k) = log q(x_k) +
const, the paper's Eq. 30). rewardtune's convention is a reward to maximise and a cost to minimise, so

    reward(x) = +E_theta(x, 0),   cost(x) = -E_theta(x, 0),

the (near-)data level's log-density: a density / out-of-distribution score (higher: more data-like), and what the
toy evaluator's energy AUC and heat map show. The DxMI `energy` reward has the opposite sign convention (p ∝ exp(-E),
reward = -E); both make "reward = log-density + const".

Two networks:
- `mlp` (vectors): DDAEBM's toy energy: x through an MLP [16, 32], a sinusoidal embedding of k (16) through an MLP
  [16, 32], both concatenated and passed through `depth` PReLU layers of width `hidden` (300, 300) to a scalar.
  A piecewise-linear E can grow without bound along rays, so exp(+E) need not be normalisable; `base_std = s > 0`
  adds a Gaussian base measure, E(x, k) = f(x, k) - ||x||^2 / (2 s^2) (p ∝ N(x; 0, s^2 I) exp(f)), which makes it
  so (0: DDAEBM's network as published).
- `unet` (images): E(x, k) = -1/2 ||x - f_theta(x, k)||^2 summed over pixels (the paper's Eq. 24), f a diffusers
  `UNet2DModel` called with the timestep 250 k (the levels spread over the UNet's DDPM-scale time embedding).

The energy is trained by the `ddaebm` algorithm, which owns its update (real pairs against generated ones, with the
zero-centred gradient penalty): the reward declares `trained_by_algorithm`, and its `update` raises a RecipeError.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from rewardtune.errors import RecipeError
from rewardtune.nets.mlp import SinusoidalTimeEmbedding
from rewardtune.optim import GradStep
from rewardtune.rewards.base import Reward


class TimeEnergyMLP(nn.Module):
    """E(x, k) [B] for vectors x [B, D] and integer levels k [B] (DDAEBM's `Energy_small`; see the module docstring)."""

    def __init__(self, dim: int, *, hidden: int = 300, depth: int = 2, time_dim: int = 16, base_std: float = 0.0) -> None:
        super().__init__()
        if base_std < 0:
            raise ValueError(f"base_std must be >= 0 (0: no base measure), got {base_std}")
        self.base_std = base_std
        self.x_branch = nn.Sequential(nn.Linear(dim, 16), nn.PReLU(), nn.Linear(16, 32), nn.PReLU())
        self.embed = SinusoidalTimeEmbedding(time_dim)
        self.t_branch = nn.Sequential(nn.Linear(time_dim, 16), nn.PReLU(), nn.Linear(16, 32), nn.PReLU())
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.PReLU()]
            width = hidden
        self.head = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.x_branch(x.flatten(1)), self.t_branch(self.embed(levels.float()))], dim=1)
        energy = self.head(features).squeeze(1)
        if self.base_std > 0:
            energy = energy - x.flatten(1).pow(2).sum(1) / (2 * self.base_std**2)  # log N(x; 0, s^2 I) + const
        return energy


class UNetTimeEnergy(nn.Module):
    """E(x, k) = -1/2 ||x - f(x, k)||^2 [B] for images x [B, C, H, W] (DDAEBM Eq. 24), f a diffusers UNet2DModel
    given the level k as the timestep k * `level_scale`."""

    def __init__(self, unet: nn.Module, level_scale: float = 250.0) -> None:
        super().__init__()
        self.unet = unet
        self.level_scale = level_scale

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        reconstruction = self.unet(x, levels.float() * self.level_scale).sample
        return -0.5 * (x - reconstruction).pow(2).flatten(1).sum(1)


class TimeEnergy(Reward):
    """reward(x) = E_theta(x, 0): DDAEBM's energy at the data level (see the module docstring for the sign).

    Args:
        network: E(x, k) -> [B] (`TimeEnergyMLP`, `UNetTimeEnergy`, or any module of that signature).
        num_levels: T, the number of noisy levels (k runs over 0..T).
        optimizer: the `GradStep` that trains `network` (the `ddaebm` algorithm steps it).
    """

    name: ClassVar[str] = "time_energy"
    learns: ClassVar[bool] = True
    trained_by_algorithm: ClassVar[bool] = True  # no rollout update: an algorithm that `trains_reward` steps it
    cost_label: ClassVar[str] = "cost -E(x, 0) (white: low, data-like)"  # the toy heat map's colour bar

    def __init__(self, network: nn.Module, num_levels: int, optimizer: GradStep) -> None:
        super().__init__()
        self.network = network
        self.num_levels = num_levels
        self.optimizer = optimizer

    def energy(self, x: torch.Tensor, levels: torch.Tensor | int) -> torch.Tensor:
        """E_theta(x, k) [B] (log-density up to a constant) at levels k [B] (or one int for all)."""
        if isinstance(levels, int):
            levels = torch.full((x.shape[0],), levels, dtype=torch.long, device=x.device)
        return self.network(x, levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x, 0)

    def optimizers(self) -> list:
        return [self.optimizer]

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        raise RecipeError("reward time_energy is trained by algorithm ddaebm (teacher-forced pairs), not by sampler "
                          "rollouts: use [algorithm] kind = \"ddaebm\"")


def build_time_energy_reward(
    sample_shape: tuple[int, ...],
    num_steps: int,
    /,
    *,
    network: Literal["mlp", "unet"] = "mlp",
    hidden: int = 300,
    depth: int = 2,
    unet: dict | None = None,
    lr: float = 1e-4,
    grad_clip: float | None = None,
    base_std: float = 0.0,
) -> TimeEnergy:
    """Reward `time_energy` (see the module docstring). `unet` is a diffusers UNet2DModel config for `network =
    "unet"` (in and out channels default to the data's). `base_std` (mlp only, data units): a Gaussian base measure
    N(0, base_std^2 I) under exp(f), 0 for none. Adam with betas (0, 0.9), DDAEBM's.

    Raises:
        ValueError: an unknown network, `unet` settings without `network = "unet"`, an mlp for image data,
            `base_std` < 0 or with the unet (whose E = -1/2 ||x - f(x, k)||^2 is bounded above already).
    """
    if network == "mlp":
        if unet is not None:
            raise ValueError("unet settings need network = \"unet\"")
        if len(sample_shape) != 1:
            raise ValueError(f"network \"mlp\" is for vectors; the data are {tuple(sample_shape)}: use network = \"unet\"")
        net: nn.Module = TimeEnergyMLP(sample_shape[0], hidden=hidden, depth=depth, base_std=base_std)
    elif network == "unet":
        if base_std:
            raise ValueError("base_std is for network = \"mlp\" (the unet energy is bounded above already)")
        if len(sample_shape) != 3:
            raise ValueError(f"network \"unet\" is for images [C, H, W]; the data are {tuple(sample_shape)}")
        from diffusers import UNet2DModel

        channels = sample_shape[0]
        config = {"sample_size": sample_shape[-1], "in_channels": channels, "out_channels": channels, **(unet or {})}
        net = UNetTimeEnergy(UNet2DModel(**config))
    else:
        raise ValueError(f"unknown time_energy network {network!r}: expected \"mlp\" or \"unet\"")
    return TimeEnergy(net, num_steps, GradStep([(net.parameters(), lr)], grad_clip=grad_clip, betas=(0.0, 0.9)))
