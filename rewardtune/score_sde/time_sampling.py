"""Time weighting lambda(t) and importance-sampled t for the discriminator's denoising loss (the boosting thesis's
J_MSE, ../shared/papers/004 Eq. 5.26; Song et al. 2021, "Maximum Likelihood Training of Score-Based Diffusion
Models", Sec. 5 for the likelihood weighting and its importance sampling).

The loss is J = E_{t ~ U[t_min, 1]} [lambda(t) l(t)], with l(t) the squared score residual at time t, whose size
grows like 1 / sigma_t^2. `dsm_residual_loss` computes sigma_t^2 l(t) (the residual in noise units, O(1) at every t),
so each sampled t carries the weight w(t) = lambda(t) / sigma_t^2:

- uniform t:    t ~ U[t_min, 1],        w(t) = lambda(t) / sigma_t^2;
- importance t: t ~ q(t) ∝ lambda(t) / sigma_t^2 (inverse CDF on a grid),  w = Z = mean over [t_min, 1] of
  lambda / sigma^2, a constant: E_q[Z sigma^2 l] = E_U[lambda l], the same objective with every draw weighted alike.

Weightings: "sigma2" (lambda = sigma_t^2, DSM's usual one: w = 1 and q uniform, so both samplers are the plain loss)
and "likelihood" (lambda = g(t)^2: J_MSE then bounds the KL divergence between the diffused distributions, Song et
al.'s Thm 1).
"""

from __future__ import annotations

from typing import Literal

import torch

from rewardtune.score_sde.sdes import SDE

WEIGHTINGS = ("sigma2", "likelihood")
SAMPLINGS = ("uniform", "importance")


def time_weight(weighting: str, sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """lambda(t) [same shape as t].

    Raises:
        ValueError: an unknown weighting.
    """
    if weighting == "sigma2":
        return sde.sigma(t) ** 2
    if weighting == "likelihood":
        return sde.diffusion_squared(t)
    raise ValueError(f"unknown time weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")


class TimeSampler:
    """Draws (t, w) for the denoising loss (module docstring).

    Args:
        sde: the forward SDE.
        weighting: "sigma2" or "likelihood".
        sampling: "uniform" or "importance".
        t_min: the smallest time.
        grid: points of the inverse-CDF table (importance sampling).

    Raises:
        ValueError: an unknown weighting or sampling, t_min outside (0, 1).
    """

    def __init__(self, sde: SDE, *, weighting: Literal["sigma2", "likelihood"] = "sigma2",
                 sampling: Literal["uniform", "importance"] = "uniform", t_min: float = 1e-3, grid: int = 4096) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown time sampling {sampling!r}: expected one of {', '.join(SAMPLINGS)}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {t_min}")
        time_weight(weighting, sde, torch.tensor([0.5]))  # an unknown weighting fails here
        self.sde, self.weighting, self.sampling, self.t_min = sde, weighting, sampling, t_min
        ts = torch.linspace(t_min, 1.0, grid, dtype=torch.float64)
        density = self.density(ts)  # lambda / sigma^2 on the grid
        pieces = 0.5 * (density[1:] + density[:-1]) * (ts[1:] - ts[:-1])  # trapezoids
        self.grid_t = ts
        self.cdf = torch.cat([torch.zeros(1, dtype=torch.float64), pieces.cumsum(0)])
        self.normaliser = float(self.cdf[-1] / (1 - t_min))  # Z, the mean of lambda / sigma^2 over [t_min, 1]

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) / sigma_t^2, the weight of a uniformly drawn t."""
        return time_weight(self.weighting, self.sde, t) / self.sde.sigma(t) ** 2

    def sample(self, n: int, generator: torch.Generator | None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """n times [n] and their weights [n] (module docstring)."""
        u = torch.rand(n, generator=generator, dtype=dtype)
        if self.sampling == "uniform":
            t = self.t_min + (1 - self.t_min) * u
            if self.weighting == "sigma2":
                return t, torch.ones_like(t)
            return t, self.density(t.double()).to(dtype)
        target = u.double() * self.cdf[-1]
        index = torch.searchsorted(self.cdf, target).clamp(1, len(self.cdf) - 1)
        c0, c1 = self.cdf[index - 1], self.cdf[index]
        t0, t1 = self.grid_t[index - 1], self.grid_t[index]
        t = t0 + (t1 - t0) * ((target - c0) / (c1 - c0).clamp_min(1e-300))  # linear within the grid cell
        return t.to(dtype), torch.full((n,), self.normaliser, dtype=dtype)
