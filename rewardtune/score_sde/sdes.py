"""Forward SDEs dx = f(x, t) dt + g(t) dw on t in [0, 1] (Song et al. 2021, "Score-Based Generative Modeling through
SDEs", Sec. 3.4 and Appendix B), each linear: f(x, t) = a(t) x, so x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I).

- VP:     beta(t) = beta_min + t (beta_max - beta_min),  a = -beta/2,  g^2 = beta,
          alpha = exp(-t^2 (beta_max - beta_min)/4 - t beta_min/2),  sigma^2 = 1 - alpha^2.
- sub-VP: a and alpha as VP,  g^2 = beta (1 - alpha^4),  sigma^2 = (1 - alpha^2)^2.
- VE:     a = 0,  sigma_ve(t) = sigma_min (sigma_max / sigma_min)^t,  g^2 = d sigma_ve^2 / dt,  alpha = 1,
          sigma^2 = sigma_ve(t)^2 - sigma_min^2 (exactly the SDE's variance started from x_0 at t = 0).

Every method takes times as tensors (broadcast against the batch) and returns float tensors of their shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VPSDE:
    """The variance-preserving SDE (DDPM's continuous limit)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def drift_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """a(t) of f(x, t) = a(t) x."""
        return -0.5 * self.beta(t)

    def diffusion_squared(self, t: torch.Tensor) -> torch.Tensor:
        """g(t)^2."""
        return self.beta(t)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """The mean coefficient of x_t | x_0."""
        return torch.exp(-0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The standard deviation of x_t | x_0."""
        return (1 - self.alpha(t) ** 2).clamp_min(0).sqrt()


@dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """The sub-VP SDE (its variance is below the VP one's at every t)."""

    def diffusion_squared(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta(t) * (1 - self.alpha(t) ** 4)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - self.alpha(t) ** 2


@dataclass(frozen=True)
class VESDE:
    """The variance-exploding SDE (NCSN's continuous limit)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def sigma_ve(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def diffusion_squared(self, t: torch.Tensor) -> torch.Tensor:
        return 2 * self.sigma_ve(t) ** 2 * math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return (self.sigma_ve(t) ** 2 - self.sigma_min**2).clamp_min(0).sqrt()


SDE = VPSDE | SubVPSDE | VESDE


def make_sde(kind: str, **params: float) -> SDE:
    """"vp", "subvp" or "ve" with their parameters.

    Raises:
        ValueError: an unknown kind.
    """
    kinds = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
    if kind not in kinds:
        raise ValueError(f"unknown SDE {kind!r}: expected one of {', '.join(kinds)}")
    return kinds[kind](**params)


def transition_kernel(sde: SDE, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t | x_s ~ N(m x_s, v I) for s <= t: returns (m, v) = (alpha_t / alpha_s, sigma_t^2 - m^2 sigma_s^2) (the linear
    SDE's kernel; restart sampling re-noises with it)."""
    m = sde.alpha(t) / sde.alpha(s)
    return m, (sde.sigma(t) ** 2 - m**2 * sde.sigma(s) ** 2).clamp_min(0)
