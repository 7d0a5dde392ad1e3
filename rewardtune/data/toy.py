"""Toy 2D data: the 8 Gaussians of the DxMI paper's Sec. 5.1 (from the BNAF/FFJORD generator).

Centres at radius 4 on the compass and diagonal directions, std 0.5, everything divided by 1.414 (so the centres sit
at radius ~2.83 with std ~0.354). Sampling takes an explicit generator.
"""

from __future__ import annotations

import math

import torch

from rewardtune.conditions import Conditions

SCALE = 1.414


class EightGaussians:
    """The 8-Gaussians distribution in R^2, with its exact density for reference."""

    sample_shape = (2,)
    radius = 4.0
    std = 0.5

    def __init__(self) -> None:
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        self.centers = self.radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) / SCALE  # [8, 2]

    num_classes = 8  # the mixture components, the class labels of a conditional run

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        return self.sample_conditioned(n, generator, device)[0]

    def sample_conditioned(
        self, n: int, generator: torch.Generator | None = None, device="cpu"
    ) -> tuple[torch.Tensor, Conditions]:
        """n points [n, 2] and their components (class labels 0..7, counter-clockwise from the +x axis)."""
        idx = torch.randint(0, 8, (n,), generator=generator)
        noise = torch.randn((n, 2), generator=generator, dtype=torch.float64)
        x = self.centers[idx] + noise * self.std / SCALE
        return x.float().to(device), Conditions(labels=idx.to(device))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The component whose centre is nearest to each point of x [B, 2]: int64 [B]."""
        return torch.cdist(x.double().cpu(), self.centers).argmin(1)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) of the mixture: [B]."""
        s = self.std / SCALE
        sq = (x.double()[:, None, :] - self.centers[None]).pow(2).sum(-1)  # [B, 8]
        log_comp = -0.5 * sq / s**2 - 2 * math.log(s) - math.log(2 * math.pi)
        return (torch.logsumexp(log_comp, dim=1) - math.log(8)).float()


def build_eight_gaussians() -> EightGaussians:
    """Data `8gaussians`."""
    return EightGaussians()
